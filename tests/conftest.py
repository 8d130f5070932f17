"""8 fake CPU devices for every test, so each sharding path runs without an accelerator."""

import os

# must be set before jax is imported anywhere. No LLVM optimisation: the tests compile hundreds
# of micro programs whose run time is milliseconds, so optimising them costs more than it saves
# (a third of test_accumulation's time); what the tests assert (numerics against a reference,
# sharding, memory from XLA's buffer assignment) is decided before LLVM.
# (once: pytest-xdist's workers inherit the main process's environment, which has them already)
_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in ("--xla_force_host_platform_device_count=8",
                                                          "--xla_backend_optimization_level=0")
                                             if f not in _flags])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
