"""The cluster launch scripts: valid syntax, and --dry-run prints the exact commands with the
config and workdir given, without calling gcloud, kubectl or srun."""

import os
import subprocess
import sys

import pytest
import yaml

from helpers import ROOT

CONFIG, BUCKET_WORKDIR = "configs/llama_7b.py", "gs://my-bucket/runs/llama_7b"
# PATH without gcloud/kubectl/srun (python3 for gke.sh's renderer): calling one would fail
ENV = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:/usr/bin:/bin")


def dry_run(*args):
    done = subprocess.run(["bash", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("script", ["launch/tpu_pod.sh", "launch/slurm.sbatch", "launch/gke.sh",
                                    "launch/lib.sh"])
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_tpu_pod_dry_run_creates_installs_mounts_and_trains_on_every_worker():
    out = dry_run("launch/tpu_pod.sh", "--name=pod", "--zone=us-east5-a", "--type=v5p-64",
                  f"--config={CONFIG}", f"--workdir={BUCKET_WORKDIR}", "--dry-run", "--",
                  "--config.train.steps=10")
    lines = out.splitlines()
    assert lines[0] == ("+ gcloud compute tpus tpu-vm create pod --zone=us-east5-a "
                        "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5")
    assert all(line.startswith("+ ") for line in lines)
    assert "gcsfuse --implicit-dirs my-bucket /gcs/my-bucket" in out
    train = lines[-1]
    assert "ssh pod --zone=us-east5-a --worker=all" in train
    assert (f"-m llama_jax.train --config={CONFIG} --workdir=/gcs/my-bucket/runs/llama_7b "
            "--config.train.steps=10") in train


def test_slurm_dry_run_prints_the_srun_command():
    out = dry_run("launch/slurm.sbatch", "--dry-run", f"--config={CONFIG}",
                  "--workdir=/shared/runs/7b", "--", "--config.train.steps=10")
    assert out == ("+ srun --kill-on-bad-exit=1 --cpu-bind=none .venv/bin/python -m "
                   f"llama_jax.train --config={CONFIG} --workdir=/shared/runs/7b "
                   "--config.train.steps=10\n")


def test_gke_template_loads_and_the_dry_run_renders_every_field():
    template = yaml.safe_load((ROOT / "launch/gke_jobset.yaml").read_text())
    assert template["kind"] == "JobSet"
    out = dry_run("launch/gke.sh", "--name=llama", "--image=example/llama_jax:1", "--tpu=v5p",
                  "--topology=4x4x2", f"--config={CONFIG}", f"--workdir={BUCKET_WORKDIR}",
                  "--dry-run", "--", "--config.train.steps=10")
    rendered, command = out.split("+ kubectl")
    jobset = yaml.safe_load(rendered)
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = job["template"]["spec"]
    container = pod["containers"][0]
    assert jobset["metadata"]["name"] == "llama" and "$" not in rendered
    assert job["parallelism"] == job["completions"] == 8  # 32 chips, 4 per host
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5p-slice"
    assert container["command"][-2:] == [f"--config={CONFIG}",
                                         "--workdir=/gcs/my-bucket/runs/llama_7b"]
    assert container["args"] == ["--config.train.steps=10"]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert command.startswith(" apply -f -")


def test_a_missing_argument_is_one_line_that_names_it():
    done = subprocess.run(["bash", "launch/gke.sh", "--name=x", "--dry-run"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr.startswith("error: --image= is required")


def test_tpu_pod_with_slices_queues_them_together_and_runs_on_every_slice():
    out = dry_run("launch/tpu_pod.sh", "--name=pod", "--zone=us-east5-a", "--type=v5p-64",
                  "--slices=2", f"--config={CONFIG}", f"--workdir={BUCKET_WORKDIR}", "--dry-run")
    lines = out.splitlines()
    assert lines[0] == ("+ gcloud compute tpus queued-resources create pod --zone=us-east5-a "
                        "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 "
                        "--node-count=2 --node-prefix=pod")
    trains = [line for line in lines if "llama_jax.train" in line]
    assert [t.split()[6] for t in trains] == ["pod-0", "pod-1"]
    assert all(t.endswith("--config.mesh.slices=2 2>&1 | tee -a ~/train.log'") for t in trains)
    assert sum("scp" in line for line in lines) == 2


def test_gke_with_slices_runs_one_job_per_slice_with_the_multislice_environment():
    out = dry_run("launch/gke.sh", "--name=llama", "--image=example/llama_jax:1", "--tpu=v5p",
                  "--topology=4x4x2", "--slices=2", f"--config={CONFIG}",
                  f"--workdir={BUCKET_WORKDIR}", "--dry-run")
    jobset = yaml.safe_load(out.split("+ kubectl")[0])
    replicated = jobset["spec"]["replicatedJobs"][0]
    assert replicated["replicas"] == 2 and replicated["template"]["spec"]["parallelism"] == 8
    container = replicated["template"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["MEGASCALE_NUM_SLICES"] == "2"
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "llama-slice-0-0.llama"
    assert env["MEGASCALE_SLICE_ID"] == {
        "fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-index']"}}
    assert container["args"] == ["--config.mesh.slices=2"]
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    # one slice: no multi-slice environment at all
    single = yaml.safe_load(dry_run("launch/gke.sh", "--name=llama", "--image=i", "--tpu=v5p",
                                    "--topology=4x4x2", f"--config={CONFIG}",
                                    f"--workdir={BUCKET_WORKDIR}", "--dry-run").split("+ kubectl")[0])
    assert single["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"][0]["env"] == []


def test_local_launcher_silences_the_others_and_ends_on_the_failing_process_error(tmp_path):
    # process 1 stands in for a JAX peer: when stopped it prints what the coordination
    # service's fatals look like; process 0 fails once process 1 is ready
    ready = tmp_path / "ready"
    script = (
        "import os, pathlib, signal, sys, time; i = os.environ['LLAMA_JAX_PROCESS_ID']; "
        f"ready = pathlib.Path({str(ready)!r})\n"
        "if i == '1':\n"
        "    signal.signal(signal.SIGTERM, lambda *_: (print('F0000 fatal spew', file=sys.stderr,"
        " flush=True), sys.exit(1)))\n"
        "    print('peer up', flush=True); ready.touch(); time.sleep(60)\n"
        "while not ready.exists(): time.sleep(0.05)\n"
        "print('error: the run failed: fix it', file=sys.stderr); sys.exit(2)\n")
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), "-n=2",
                           "--grace_s=5", "--", sys.executable, "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "[1] peer up" in done.stdout  # relayed while nothing had failed
    assert "spew" not in done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert "[launch] process 0 exited with 2: stopping the others" in done.stderr
    assert lines[-1] == "[0] error: the run failed: fix it"
