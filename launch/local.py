"""Runs N processes of one JAX program on this machine, M CPU devices each, as one job:

  python launch/local.py -n 2 --devices_per_process=2 -- \
      python -m llama_jax.train --config=configs/tiny.py --workdir=runs/tiny_2proc

Each child gets XLA_FLAGS (M host devices), JAX_PLATFORMS=cpu, gloo cross-process collectives
(JAX_CPU_COLLECTIVES_IMPLEMENTATION) and LLAMA_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID,
which llama_jax.distributed.initialize reads. Output lines are prefixed with "[i] ". When one
child fails the others get SIGTERM, then SIGKILL after --grace_s, and their stderr is no longer
shown (it is their reaction to the failure: gRPC fatals, stale hints); the failing child's last
`error:` line (else its last line) is printed last. SIGTERM or SIGINT sent to the launcher is
passed on to every child. The exit status is that of the first failing child (0 if none).
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


class Output:
    """The children's output, relayed line by line; once one child fails, the others' stderr is
    dropped: it is their reaction to its death (gRPC fatals) and would bury its error."""

    def __init__(self, children):
        self.children, self.first_failed = children, None
        self.last_line = {}  # child index -> its last `error:` line, else its last line
        self.lock = threading.Lock()
        # set once the launcher passes a signal on: then each child's exit is expected, its
        # output all shown, and none of them is "the" failure
        self.told_to_stop = False

    def failed(self):
        """The index of the first child seen exiting non-zero, or None."""
        with self.lock:
            if self.first_failed is None and not self.told_to_stop:
                failing = [i for i, child in enumerate(self.children)
                           if child.poll() not in (None, 0)]
                # of several seen at once, one that said why is the cause, not a casualty
                failing.sort(key=lambda i: not self.last_line.get(i, "").startswith("error:"))
                self.first_failed = failing[0] if failing else None
            return self.first_failed

    def relay(self, index, stream, out):
        for line in stream:
            if line.strip() and (line.startswith("error:") or
                                 not self.last_line.get(index, "").startswith("error:")):
                self.last_line[index] = line.rstrip("\n")
            # polled at each line: a peer's fatals can arrive before the main loop's next look
            if out is not sys.stderr or self.failed() in (None, index):
                out.write(f"[{index}] {line}")
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
    output = Output(children)

    def forward(signum, _frame):
        output.told_to_stop = True
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
            relays.append(threading.Thread(target=output.relay, args=(index, stream, out),
                                           daemon=True))
            relays[-1].start()

    while [child.poll() for child in children].count(None):  # polls every child, every time
        first = output.failed()
        if first is not None:
            print(f"[launch] process {first} exited with {children[first].returncode}: "
                  f"stopping the others (SIGKILL after {grace_s:g} s)", file=sys.stderr,
                  flush=True)
            stop(children, grace_s)
            break
        time.sleep(0.1)
    for thread in relays:
        thread.join(timeout=5)
    first = output.failed()
    if first is not None and first in output.last_line:  # where the terminal's last line is read
        print(f"[{first}] {output.last_line[first]}", file=sys.stderr, flush=True)
    status = children[first].returncode if first is not None else next(
        (c.returncode for c in children if c.returncode), 0)
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
