"""Multi-process start-up: jax.distributed from explicit flags, or from the environment as JAX
detects it (TPU pod VMs, GKE, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS); otherwise one process.
Call initialize() first in an entry point, before anything touches a JAX device.
"""

import os
import sys

from absl import flags, logging


def define_flags():
    """--coordinator, --num_processes, --process_id; an entry point defines them when run as a
    program (so importing several entry points in one process never clashes)."""
    flags.DEFINE_string("coordinator", None, "HOST:PORT of the coordinator service that process "
                        "0 starts; with --num_processes and --process_id, for a cluster JAX does "
                        "not detect by itself. Unset: detected from the environment, else one "
                        "process.")
    flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
    flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")


# what jax.distributed.initialize() raises when it found no cluster to read its settings from
_NO_CLUSTER = "coordinator_address should be defined"


def initialize(coordinator=None, num_processes=None, process_id=None):
    """Joins the job described by the arguments or the environment; a no-op for one process."""
    import jax  # here, not above: an entry point defines our flags before it loads JAX
    explicit = (coordinator, num_processes, process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise ValueError("--coordinator, --num_processes and --process_id go together: set "
                             "all three (or none, to detect the cluster from the environment)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} is not in 0..{num_processes - 1} "
                             f"(--num_processes={num_processes})")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        try:
            jax.distributed.initialize()
        except ValueError as e:
            if _NO_CLUSTER not in str(e):
                raise
            return  # no cluster environment: a single-process run
    logging.info("process %d of %d (coordinator %s), %d local devices of %d",
                 jax.process_index(), jax.process_count(), coordinator or "from the environment",
                 jax.local_device_count(), jax.device_count())


def initialize_from_flags():
    """The flags, else the LLAMA_JAX_* variables that launch/local.py sets."""
    def pick(flag, env, kind):
        value = getattr(flags.FLAGS, flag)
        if value is None and os.environ.get(env):
            value = kind(os.environ[env])
        return value

    initialize(pick("coordinator", "LLAMA_JAX_COORDINATOR", str),
               pick("num_processes", "LLAMA_JAX_NUM_PROCESSES", int),
               pick("process_id", "LLAMA_JAX_PROCESS_ID", int))


def barrier(name, timeout_s=3600):
    """Waits until every process reaches `name`. A coordination-service barrier, not a device
    collective: CPU (gloo) collectives give up after 30 s, too soon for e.g. tokenizer training."""
    import jax
    import orbax.checkpoint as ocp
    ocp.multihost.sync_global_processes(name, timeout=timeout_s,
                                        processes=set(range(jax.process_count())))


def exit_failed(message):
    """Prints message and exits 1. In a multi-process job it exits at once: JAX's exit handler
    would wait (up to 5 minutes) at a shutdown barrier for peers that are themselves stuck
    waiting for this process; its death is what tells them (and the launcher) to stop."""
    print(message, file=sys.stderr, flush=True)
    import jax
    if jax.distributed.is_initialized():
        logging.flush()
        sys.stdout.flush()
        os._exit(1)
    sys.exit(1)
