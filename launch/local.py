"""Runs N processes of one JAX program on this machine, M CPU devices each, as one job:

  python launch/local.py -n 2 --devices_per_process=2 -- \
      python -m llama_jax.train --config=configs/tiny.py --workdir=runs/tiny_2proc

Each child gets XLA_FLAGS (M host devices), JAX_PLATFORMS=cpu, gloo cross-process collectives
(JAX_CPU_COLLECTIVES_IMPLEMENTATION) and LLAMA_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID,
which llama_jax.distributed.initialize reads. Output lines are prefixed with "[i] ". When one
child fails the others get SIGTERM, then SIGKILL after --grace_s; SIGTERM or SIGINT sent to the
launcher is passed on to every child. The exit status is that of a failing child (0 if none).
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from llama_jax import ranges


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(index, count, devices, coordinator):
    env = dict(os.environ)
    # replace, not append to, any device count the caller's environment already forces
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                       env.get("XLA_FLAGS", ""))
    env.update(
        XLA_FLAGS=f"{xla_flags} --xla_force_host_platform_device_count={devices}".strip(),
        JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        LLAMA_JAX_COORDINATOR=coordinator, LLAMA_JAX_NUM_PROCESSES=str(count),
        LLAMA_JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
    return env


def relay(stream, out, prefix):
    for line in stream:
        out.write(prefix + line)
        out.flush()


def stop(children, grace_s):
    """SIGTERM to the running children, SIGKILL to those still running after grace_s."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def launch(command, num_processes, devices_per_process, grace_s):
    coordinator = f"127.0.0.1:{free_port()}"
    children, relays = [], []

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    # installed before the first child starts, so no signal falls between start and handler
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(num_processes):
        # own session: a terminal's Ctrl-C reaches the launcher, which passes it on once
        try:
            child = subprocess.Popen(command, env=child_env(index, num_processes,
                                                            devices_per_process, coordinator),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     errors="replace", start_new_session=True)
        except OSError as e:
            stop(children, grace_s)
            sys.exit(f"error: cannot run {command[0]!r} ({e.strerror}): check the command "
                     "after --")
        children.append(child)
        print(f"[launch] process {index} pid {child.pid}", file=sys.stderr, flush=True)
        for stream, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
            relays.append(threading.Thread(target=relay, args=(stream, out, f"[{index}] "),
                                           daemon=True))
            relays[-1].start()

    status = 0
    while [child.poll() for child in children].count(None):  # polls every child, every time
        failed = [c for c in children if c.returncode not in (None, 0)]
        if failed:
            status = failed[0].returncode
            print(f"[launch] process {children.index(failed[0])} exited with {status}: "
                  f"stopping the others (SIGKILL after {grace_s:g} s)", file=sys.stderr)
            stop(children, grace_s)
            break
        time.sleep(0.1)
    status = status or next((c.returncode for c in children if c.returncode), 0)
    for thread in relays:
        thread.join(timeout=5)
    # a child killed by signal N has returncode -N; report it the way a shell does
    return status if status >= 0 else 128 - status


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage=(
        "python launch/local.py -n N --devices_per_process=M -- COMMAND ..."))
    parser.add_argument("-n", "--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--grace_s", type=float, default=30.0,
                        help="seconds between SIGTERM and SIGKILL when stopping the others")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: put it after --, e.g. -- python -m llama_jax.train ...")
    try:
        ranges.check_flags("local", {name: getattr(args, name) for name in ranges.FLAGS["local"]})
    except ValueError as e:
        sys.exit(f"error: {e}")
    sys.exit(launch(command, args.num_processes, args.devices_per_process, args.grace_s))


if __name__ == "__main__":
    main()
