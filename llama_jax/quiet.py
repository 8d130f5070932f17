"""A quiet start-up: the libraries below us print pages of notices before our first line
(TensorFlow's native start-up, libtpu probing a host with no TPU, Orbax's INFO lines). This
module, applied by llama_jax/__init__.py before any of them loads, keeps them out of the way.

Everything here is a default: a variable the user has set wins, LLAMA_JAX_VERBOSE=1 turns it all
off, and absl's --verbosity=1 brings the libraries' INFO lines back. Warnings and errors always
pass, and native output is filtered line by line against the known notices, never dropped whole.
"""

import contextlib
import glob
import logging
import os
import re
import sys
import tempfile

VERBOSE = os.environ.get("LLAMA_JAX_VERBOSE", "0") not in ("", "0")

# Native lines printed while TensorFlow loads, hides its GPUs and builds the SentencePiece op;
# none says anything about this run (TensorFlow only runs the input pipeline, on the host CPU)
NATIVE_NOTICES = re.compile("|".join([
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"oneDNN custom operations are on",
    r"Could not find cuda drivers on your machine, GPU will not be used",
    r"This TensorFlow binary is optimized to use available CPU instructions",
    r"rebuild TensorFlow with the appropriate compiler flags",
    r"failed call to cuInit",  # TensorFlow's own GPU probe; its GPUs are hidden either way
    r"precompiled_charsmap is empty\. use identity normalization",  # our identity normaliser
    # libtpu loaded for compile-only TPU devices (compile.py) looks for a TPU VM's settings
    r"Failed to find host bounds for accelerator type",
    r"could not determine TPU accelerator type",
    r"Logging before InitGoogle\(\) is written to STDERR",
    r"INVALID_ARGUMENT: Error: unexpected worker hostname",
    r"^=== Source Location Trace: === *$",
    r"^\S*/libtpu_init_utils\.cc:\d+$",
]))
# Orbax warnings about healthy checkpoints: the read-only manager that evaluate, generate and
# convert open (Orbax warns that it changed the options read-only implies) and a step saved
# without the optional metadata file
HEALTHY_CHECKPOINT_WARNINGS = re.compile("|".join([
    r"CheckpointManagerOptions\.read_only=True, setting",
    r"Given directory is read only=",
    r"Metadata file does not exist: .*_CHECKPOINT_METADATA",
]))
# Python packages whose INFO records are bookkeeping (Orbax logs ~80 lines per checkpoint,
# TensorFlow one per saved data-iterator state)
QUIET_PACKAGES = ("orbax", "tensorflow", "tensorflow_datasets")

# device files of a TPU chip (/dev/accel* on v4 and v5p, /dev/vfio/N on v5e and newer) and of a
# GPU (NVIDIA, WSL, AMD); lspci's vendor 0x1ae0 is Google, as jax's own TPU detection reads it
TPU_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*")
GPU_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def has_accelerator_files():
    """True when this host shows any TPU or GPU device to user space."""
    if any(glob.glob(pattern) for pattern in TPU_DEVICES):
        return True
    if any(os.path.exists(path) for path in GPU_DEVICES):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == "0x1ae0":
                    return True
        except OSError:
            continue
    return False


def set_environment_defaults():
    """Runs before TensorFlow or JAX is imported: their native libraries read these once."""
    if VERBOSE:
        return
    # C++ INFO lines of TensorFlow and XLA (warnings and errors still print)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    # With libtpu installed (make test installs it) JAX tries the TPU backend on every host, and
    # on one without a TPU libtpu prints errors about accelerator types and worker hostnames
    # before JAX falls back. Where no accelerator device file exists, the CPU is the only
    # backend there can be, so ask for it directly; on a TPU or GPU host nothing changes and
    # any error there is a real one.
    if not has_accelerator_files():
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


class LibraryInfoFilter(logging.Filter):
    """Drops INFO and DEBUG records logged from QUIET_PACKAGES' files unless verbosity asks for
    them. Orbax logs through absl's logger, which is ours too, so the file decides."""

    def filter(self, record):
        if VERBOSE:
            return True
        path = record.pathname.replace("\\", "/")
        if not any(f"/{package}/" in path for package in QUIET_PACKAGES):
            return True
        if record.levelno >= logging.WARNING:
            return not (record.levelno == logging.WARNING and "/orbax/" in path and
                        HEALTHY_CHECKPOINT_WARNINGS.search(record.getMessage()))
        from absl import logging as absl_logging
        return absl_logging.get_verbosity() >= 1  # --verbosity=1 (DEBUG) shows them all


def install_log_filter():
    """On absl's handler, which app.run puts on the root logger: every entry point's output
    passes through it, whichever logger a record comes from."""
    from absl import logging as absl_logging
    # and on absl's logger, for a program that never starts absl's app (lm-eval's command line):
    # Orbax logs through it to whatever handler that program set up
    for where in (absl_logging.get_absl_handler(), logging.getLogger("absl")):
        if not any(isinstance(f, LibraryInfoFilter) for f in where.filters):
            where.addFilter(LibraryInfoFilter())


class PlainFormatter(logging.Formatter):
    """A log line as the message alone (a warning or error says so first): absl's prefix of
    date, thread id and file:line is for debugging the libraries, not for reading a run."""

    def format(self, record):
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname}: {text}"


def plain_log_lines():
    """Called by an entry point once absl's app has started (cli.run); LLAMA_JAX_VERBOSE=1 keeps
    absl's prefixes."""
    if VERBOSE:
        return
    from absl import logging as absl_logging
    absl_logging.get_absl_handler().setFormatter(PlainFormatter("%(message)s"))


def import_tensorflow():
    """TensorFlow, its native start-up notices filtered and its GPUs hidden: the full package
    (tensorflow-text needs it) would otherwise claim accelerator memory that belongs to JAX, and
    its first op probes CUDA ("failed call to cuInit" on a host without a GPU); the input
    pipeline runs on the host CPU."""
    with native_notices_filtered():
        import tensorflow as tf
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TensorFlow was already initialised by the caller: its choice stands
            pass
    return tf


@contextlib.contextmanager
def native_notices_filtered():
    """Inside it, output that native code writes to stderr (file descriptor 2) is collected and,
    on leaving, written out again without the lines matching NATIVE_NOTICES; so whatever else a
    library prints there, an error above all, still appears, only a moment later."""
    if VERBOSE:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as collected:
        os.dup2(collected.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except ValueError:
                pass
            os.dup2(saved, 2)
            os.close(saved)
            collected.seek(0)
            lines = collected.read().decode("utf-8", errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not NATIVE_NOTICES.search(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
