"""The `llama_jax` console command: `llama_jax train --config=... --workdir=...` runs
`python -m llama_jax.train ...`; every subcommand is a module with its own flags, except
`llama_jax lm_eval ...`, which is lm-eval's own command line with our model registered.

Every entry point parses its flags (and --config) with parse_flags() before it imports JAX,
TensorFlow or Orbax (15 s on a loaded 2-core machine), so `--help` and a bad flag or config
answer at once; cli.run(main) then starts absl's app with the flags already parsed. Light: this
module imports nothing heavy."""

import pathlib
import runpy
import signal
import sys

from absl import app, flags

from llama_jax import quiet

HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull")
_parsed = []  # the arguments parse_flags() left for main (argv[0] first)


def _interrupted(signum, frame):
    # a Ctrl-C while the libraries load (or before a tool's own handling starts) is one line,
    # not a traceback through importlib
    print("interrupted: exiting", file=sys.stderr, flush=True)
    raise SystemExit(130)


def answer_help(argv=None):
    """--help (-h, --helpshort, --helpfull) prints the flags defined so far and exits 0; from
    here on a Ctrl-C is one line."""
    argv = sys.argv if argv is None else argv
    signal.signal(signal.SIGINT, _interrupted)
    if any(arg in HELP for arg in argv[1:]):
        app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True)
        sys.exit(0)


def parse_flags(argv=None):
    """Parses argv (sys.argv) into absl's FLAGS, before the caller's heavy imports: --help
    prints the flags and exits 0; a bad flag, a --config override naming no key or a --config
    file that cannot be read is one `error:` line and exit 1."""
    argv = list(sys.argv if argv is None else argv)
    answer_help(argv)
    try:
        _parsed[:] = flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}; see --help")
    except (AttributeError, KeyError) as e:  # raised by ml_collections for an unknown override
        message = unknown_override(e, argv)
        if message is None:
            raise
        sys.exit(message)
    message = config_file_problem()
    if message is not None:
        sys.exit(message)


def run(main):
    """absl's app.run(main) on the flags parse_flags() read, logging plain lines."""
    def started(argv):
        quiet.plain_log_lines()  # absl installs its handler just before calling main
        return main(argv)
    app.run(started, flags_parser=lambda argv: list(_parsed))


def unknown_override(error, argv):
    """The one-line message for a --config.a.b=... override that names no key, from the
    AttributeError or KeyError ml_collections raises while parsing flags (it names the first
    unknown part: a key, or a misspelt section), with the nearest known keys."""
    overrides = [a.split("=")[0].removeprefix("--config.") for a in argv
                 if a.startswith("--config.")]
    # str() of a KeyError (raised bare, or inside an AttributeError) is its message's repr,
    # whose quotes are escaped
    text = str(error).replace("\\'", "'")
    key = next((o for o in overrides if any(f"'{part}'" in text for part in o.split("."))),
               None)
    if key is None:
        return None
    from llama_jax import ranges  # the config file has loaded JAX already
    near = ranges.near(key).replace(" or ", " or --config.").replace("mean ", "mean --config.")
    return f"error: --config.{key} is not a setting{near or ' (docs/configs.md lists them)'}"


def config_file_problem():
    """The one-line message for a --config=PATH that ml_collections could not read (a missing
    or unreadable file), or None when it loaded or the tool has no --config. A config file whose
    own code raises keeps its traceback: it points into that file."""
    if "config" not in flags.FLAGS:
        return None
    try:
        config = flags.FLAGS.config
        if config is not None:  # a failed load is a stand-in that raises on any attribute
            config.keys  # noqa: B018
        return None
    except OSError as e:
        path = flags.FLAGS["config"].config_filename
        if not pathlib.Path(path).is_file():
            return (f"error: --config={path}: no such file: pass a configs/*.py path (relative "
                    "paths start at the current directory)")
        # ml_collections lists the paths it attempted; the last line is the error itself
        cause = (str(e).strip().splitlines() or [""])[-1].strip()
        return f"error: --config={path} cannot be read ({cause}): fix its permissions"

COMMANDS = {name: f"llama_jax.{name}" for name in (
    "train", "bench", "data", "convert", "generate", "evaluate", "plot", "scaling", "compile")}
COMMANDS["tokenizer"] = "llama_jax.data.tokenizer"


def lm_eval():
    """lm-eval 0.4.13 has no plugin hook for outside models (its registry lazy-imports only
    lm_eval.models), so importing the adapter here is what makes `--model llama_jax` resolve;
    every other lm-eval flag passes through unchanged. Its flags are parsed first (what its
    cli_evaluate does), so --help and a bad flag answer before the adapter loads JAX."""
    try:
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except ImportError:
        sys.exit("error: lm-eval is not installed: pip install lm-eval==0.4.13 "
                 "(or pip install -e .[lm_eval])")
    signal.signal(signal.SIGINT, _interrupted)
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    from llama_jax import lm_eval_adapter  # noqa: F401  registers the model "llama_jax"
    try:
        parser.execute(args)
    except (ValueError, KeyError, OSError) as e:
        # a bad --model_args (no workdir, a missing checkpoint) is one line, not a traceback
        sys.exit(f"error: {e}")


def main():
    names = [*COMMANDS, "lm_eval"]
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        sys.exit(f"usage: llama_jax {{{','.join(names)}}} [flags]; "
                 "e.g. llama_jax train --config=configs/tiny.py --workdir=runs/tiny")
    command = sys.argv.pop(1)
    sys.argv[0] = f"llama_jax {command}"
    if command == "lm_eval":
        lm_eval()
    else:
        runpy.run_module(COMMANDS[command], run_name="__main__", alter_sys=True)
