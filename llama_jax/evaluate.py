"""Validation loss, perplexity and bits per byte of a workdir's latest checkpoint, per configured
data source (config.data.sources, each read through llama_jax.data.sources) and over all of them.

  python -m llama_jax.evaluate --workdir=runs/tiny --config=configs/tiny.py
  python -m llama_jax.evaluate --workdir=runs/converted   # model.json; the built-in code corpus

Every token of every validation document is predicted exactly once: documents are packed into
rows that overlap by one token, each row's pieces attend only within their own document.
"""

import functools
import json
import math
import sys

from absl import app, flags

from llama_jax import cli


def define_flags():
    """Defined only when run as a program, so tests can import every entry point at once."""
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "configs/*.py of a training workdir (its "
                                    "model and data sections); optional with model.json.")
    flags.DEFINE_string("workdir", None, "Workdir: latest checkpoint and tokenizer.")
    flags.DEFINE_list("sources", [], "Evaluate only these data.sources names (default: all).")
    flags.DEFINE_integer("seq_len", 0, "Tokens per row; default data.seq_len of --config, "
                         "else min(model.max_seq_len, 2048).")
    flags.DEFINE_integer("batch_size", 8, "Rows per evaluation step.")
    flags.DEFINE_integer("max_batches", 0, "Per source, stop after this many batches (0: the "
                         "whole split).")


if __name__ == "__main__":  # --help and flag or config errors answer before JAX loads
    define_flags()
    cli.parse_flags()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from llama_jax import checkpoint, parallel, ranges, train_step  # noqa: E402
from llama_jax.model import Llama  # noqa: E402


def rows(token_docs, seq_len):
    """Yields (inputs, targets, positions, segment_ids, loss_mask) rows of seq_len, each target
    once. A document cut by a row boundary continues in the next row from position 0 (as in
    training), with the boundary token repeated as that row's first input."""
    stream, segs = [], []
    for doc_id, doc in enumerate(token_docs, start=1):
        stream.extend(doc)
        segs.extend([doc_id] * len(doc))
    stream, segs = np.asarray(stream, np.int32), np.asarray(segs, np.int32)
    for start in range(0, max(len(stream) - 1, 0), seq_len):
        tok = np.zeros(seq_len + 1, np.int32)
        seg = np.zeros(seq_len + 1, np.int32)
        piece = slice(start, start + seq_len + 1)
        tok[:len(stream[piece])] = stream[piece]
        seg[:len(segs[piece])] = segs[piece]
        inputs_seg = seg[:-1]
        positions = np.zeros(seq_len, np.int32)
        for doc_id in np.unique(inputs_seg[inputs_seg > 0]):
            where = np.flatnonzero(inputs_seg == doc_id)
            positions[where] = np.arange(len(where))
        yield (tok[:-1], tok[1:], positions, inputs_seg,
               ((inputs_seg == seg[1:]) & (inputs_seg > 0)).astype(np.float32))


def evaluate_texts(cfg, params, tokenizer, texts, seq_len, batch_size, max_batches=0):
    """{'loss', 'perplexity', 'bits_per_byte', 'tokens', 'bytes'} over the texts."""
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}: "
                         "lower --seq_len")
    bos, eos = tokenizer.bos_id(), tokenizer.eos_id()
    docs = [[bos] + tokenizer.encode(t) + [eos] for t in texts if t.strip()]
    texts = [t for t in texts if t.strip()]
    step = jax.jit(functools.partial(train_step.eval_step, model=Llama(cfg), chunk_size=0))
    keys = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
    all_rows = list(rows(docs, seq_len))
    whole = not max_batches or len(all_rows) <= max_batches * batch_size
    if not whole:  # a quick look: a prefix of the documents, counted whole
        all_rows = all_rows[:max_batches * batch_size]
    nll = count = 0.0
    for b in range(0, len(all_rows), batch_size):
        chunk = all_rows[b:b + batch_size]
        chunk += [tuple(np.zeros_like(x) for x in chunk[0])] * (batch_size - len(chunk))
        batch = {k: np.stack([r[i] for r in chunk]) for i, k in enumerate(keys)}
        out = step(params, batch)
        nll += float(out["loss_sum"])
        count += float(out["tokens"])
    if not count:
        raise ValueError("no validation tokens to evaluate: check the corpus")
    # bytes of exactly the documents whose every target was scored
    scored = sum(len(d) - 1 for d in docs)
    n_bytes = (sum(len(t.encode("utf-8")) for t in texts) if count == scored else
               _bytes_of_prefix(docs, texts, int(count)))
    loss = nll / count
    # which batches: training's eval loss is its first train.eval_batches batches of packed
    # rows, so the three figures differ (docs/training.md, "Three eval losses")
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nll / (math.log(2) * n_bytes), "tokens": int(count),
            "bytes": n_bytes, "batches": -(-len(all_rows) // batch_size),
            "of": "the whole validation split" if whole else
                  f"the first {max_batches} batches (--max_batches)"}


def _bytes_of_prefix(docs, texts, targets):
    """UTF-8 bytes covered by the first `targets` predicted tokens (with --max_batches)."""
    total = 0
    for doc, text in zip(docs, texts):
        if targets >= len(doc) - 1:
            total += len(text.encode("utf-8"))
            targets -= len(doc) - 1
        else:  # a partly scored document: its bytes in proportion to its scored tokens
            total += round(len(text.encode("utf-8")) * targets / (len(doc) - 1))
            break
    return total


def validation_texts(entry, validation_fraction):
    """A source's validation documents as str, in a fixed order, or None when it has none.
    They come from the same reader training uses (llama_jax.data.sources), so a source
    evaluates exactly the documents its training run held out."""
    from llama_jax.data import sources
    docs = sources.documents(entry, "validation", train=False, seed=0,
                             validation_fraction=validation_fraction, process_index=0,
                             process_count=1)
    if docs is None:
        return None
    # invalid UTF-8 is replaced, as the built-in corpus reader does
    return [d.decode("utf-8", errors="replace") for d in docs.as_numpy_iterator()]


def selected_sources(data_config, names=()):
    """The data.sources entries to evaluate (`names` picks some), checked before any weights
    are read, so a typo costs no model load."""
    from llama_jax.data import sources
    entries = [dict(e) for e in data_config.sources]
    for entry in entries:
        sources.check_entry(entry)
    unknown = sorted(set(names) - {e["name"] for e in entries})
    if unknown:
        raise ValueError(f"--sources names {unknown}, which data.sources does not have (it has "
                         f"{[e['name'] for e in entries]}): fix the names or the config")
    return [e for e in entries if not names or e["name"] in names]


def evaluate_sources(cfg, params, tokenizer, entries, validation_fraction, seq_len, batch_size,
                     max_batches=0):
    """One result per source entry that has a validation split, in order, then "all": every
    scored token of those sources once, so its loss is their token-weighted mean (not the
    mixture-weighted one)."""
    results = []
    for entry in entries:
        texts = validation_texts(entry, validation_fraction)
        if texts is None:
            print(f"source {entry['name']!r} has no validation split (set eval_files= or "
                  "eval_split=): not evaluated", file=sys.stderr)
            continue
        if not any(t.strip() for t in texts):
            raise ValueError(f"source {entry['name']!r} has only blank validation documents")
        result = evaluate_texts(cfg, params, tokenizer, texts, seq_len, batch_size, max_batches)
        results.append({"source": entry["name"], **result})
    if not results:
        raise ValueError("no source has a validation split: set eval_files=/eval_split= on a "
                         "source")
    nll = sum(r["loss"] * r["tokens"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    n_bytes = sum(r["bytes"] for r in results)
    results.append({"source": "all", "loss": nll / tokens, "perplexity": math.exp(nll / tokens),
                    "bits_per_byte": nll / (math.log(2) * n_bytes), "tokens": tokens,
                    "bytes": n_bytes, "batches": sum(r["batches"] for r in results),
                    "of": "the sources above, token-weighted"})
    return results


def main(argv):
    from llama_jax.config import base_config
    from llama_jax.data.tokenizer import load_tokenizer
    fl = flags.FLAGS
    if len(argv) > 1 or not fl.workdir:
        raise app.UsageError("give --workdir=DIR and no positional arguments")
    try:
        ranges.check_flags("evaluate", {name: fl[name].value for name in ranges.FLAGS["evaluate"]})
        # without --config: the default data section, i.e. the built-in code corpus
        data = fl.config.data if fl.config else base_config().data
        entries = selected_sources(data, fl.sources)
        cfg, params, tok_path = checkpoint.load_model(fl.workdir, fl.config)
        if not tok_path.exists():
            raise FileNotFoundError(f"{tok_path} is missing: the workdir needs the tokenizer "
                                    "its model was trained with")
        tokenizer = load_tokenizer(tok_path, cfg.vocab_size)
        seq_len = fl.seq_len or (data.seq_len if fl.config else min(cfg.max_seq_len, 2048))
        results = evaluate_sources(cfg, parallel.place(cfg, params), tokenizer, entries,
                                   data.validation_fraction, seq_len, fl.batch_size,
                                   fl.max_batches)
    except (ValueError, KeyError, OSError) as e:
        # a known failure is one line that says the fix, not a traceback wall
        sys.exit(f"error: {e}")
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
