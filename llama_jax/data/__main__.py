"""Two commands on a config's data.sources, each printing JSON.

Prepare token stores (llama_jax/data/store.py) from the sources, in worker processes:
  python -m llama_jax.data prepare --config=configs/data_llama_mixture.py:tiny \
      --tokenizer=runs/tok/tokenizer.model --output=runs/stores --workers=2
Measure the input pipeline alone (tokens/s, each source's token share, padding fraction, mean
document length); with store= sources, the rows of one process of --processes:
  python -m llama_jax.data --config=configs/tiny.py --workdir=runs/tiny --batches=50
"""

import json
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from llama_jax import cli


def define_flags():
    """Only when run as a program: tests import measure() beside other entry points' flags."""
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")
    flags.DEFINE_string("workdir", None, "Run directory holding (or receiving) the tokenizer.")
    flags.DEFINE_integer("batches", 50, "Batches to measure, after a warm-up of 5.")
    flags.DEFINE_integer("processes", 1, "store= sources: measure one process's rows of this "
                         "many.")
    flags.DEFINE_string("output", None, "prepare: the directory receiving OUTPUT/NAME/SPLIT.")
    flags.DEFINE_string("tokenizer", None, "prepare: the .model file (default "
                        "data.tokenizer_path).")
    flags.DEFINE_list("sources", [], "prepare: only these source names (default all).")
    flags.DEFINE_integer("workers", 2, "prepare: tokenizing worker processes (0: in this one).")


if __name__ == "__main__":  # --help and flag or config errors answer before JAX loads
    define_flags()
    cli.parse_flags()

import numpy as np  # noqa: E402

from llama_jax.data import pipeline, tokenizer  # noqa: E402


def measure(batches_iter, names, batches, bos_id, warmup=5):
    for _ in range(warmup):  # tracing and filling the shuffle buffer are not throughput
        next(batches_iter)
    tokens_by_source = np.zeros(len(names))
    slots = documents = 0
    start = time.time()
    for _ in range(batches):
        batch = next(batches_iter)
        real = (batch["segment_ids"] > 0).sum(axis=1)
        np.add.at(tokens_by_source, batch["source"], real)
        slots += batch["segment_ids"].size
        documents += int((batch["inputs"] == bos_id).sum())
    seconds = time.time() - start
    tokens = tokens_by_source.sum()
    return {
        "tokens_per_sec": round(slots / seconds),
        "token_share": {n: round(float(s / tokens), 4) for n, s in zip(names, tokens_by_source)},
        "padding_fraction": round(1 - float(tokens) / slots, 4),
        "mean_document_tokens": round(float(tokens) / max(documents, 1), 1),
        "batches": batches, "seconds": round(seconds, 2),
    }


def store_batches(config, sp, processes):
    """Process 0's rows of each step's batch, read from the stores."""
    from llama_jax.data import store
    mix = store.mixture(config.data, "train", sp.path.read_bytes())
    rows = np.arange(config.data.global_batch_size // processes)
    return (mix.batch(s, config.data.global_batch_size, rows, with_source=True)
            for s in range(1, 2**62))


def run_prepare(config, config_path, fl):
    """The prepare command; an expected failure exits with one line that says the fix."""
    try:
        _prepare(config, config_path, fl)
    except (ValueError, OSError, pipeline.tf.errors.OpError) as e:
        # a worker's error arrives with the worker's traceback attached: the message is enough
        message = e.message if isinstance(e, pipeline.tf.errors.OpError) else str(e)
        sys.exit("error: " + " ".join(message.splitlines()))


def _prepare(config, config_path, fl):
    from llama_jax.data import prepare
    path = fl.tokenizer or config.data.tokenizer_path
    if not path or fl.output is None:
        raise ValueError("prepare needs --output=DIR and --tokenizer=FILE.model (or "
                         f"data.tokenizer_path in {config_path})")
    names = [e.get("name") for e in config.data.sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{config_path}: data.sources has more than one source named "
                         f"{twice[0]!r}: give each its own name= (prepare writes OUTPUT/NAME)")
    entries = [dict(e) for e in config.data.sources
               if not fl.sources or e["name"] in fl.sources]
    unknown = set(fl.sources) - {e["name"] for e in entries}
    if unknown or not entries:
        raise ValueError(f"--sources names {sorted(unknown) or fl.sources} are not in "
                         f"data.sources of {config_path} (it has {names})")
    sp = tokenizer.load_tokenizer(path, config.model.vocab_size)
    model_bytes = sp.path.read_bytes()
    for summary in prepare.prepare(entries, fl.output, (model_bytes, path, sp.vocab_size()),
                                   fl.workers, config.data.validation_fraction):
        print(json.dumps(summary), flush=True)


def main(argv):
    fl = flags.FLAGS
    if argv[1:] == ["prepare"] and fl.config is not None:
        return run_prepare(fl.config, config_flags.get_config_filename(fl["config"]), fl)
    if len(argv) > 1 or fl.config is None or fl.workdir is None:
        raise app.UsageError("usage: python -m llama_jax.data --config=C --workdir=DIR "
                             "[--batches=N] | prepare --config=C --output=DIR [--tokenizer=T]")
    config = fl.config
    sp = tokenizer.get_tokenizer(fl.workdir, config.data, config.model.vocab_size)
    names = [entry["name"] for entry in config.data.sources]
    from llama_jax.data import store
    if store.store_run(config.data):
        batches = store_batches(config, sp, fl.processes)
    else:
        batches = pipeline.make_dataset("train", config.data, sp, config.data.global_batch_size,
                                        with_source=True).as_numpy_iterator()
    print(json.dumps(measure(batches, names, fl.batches, sp.bos_id())))


if __name__ == "__main__":
    cli.run(main)
