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
