"""configs/tiny.py's model on a 3-source mixture read from token stores (docs/data.md).

The sources as documents (`:raw`, what prepare reads): the built-in code and prose corpora and
runs/notes/*.jsonl.gz (any JSON lines with a "text" key). Prepare them once, then train on the
stores (the default variant); on a 2-core CPU machine, about 4 minutes in all:
  python -m llama_jax.data.tokenizer train --config=configs/tiny_store.py:raw \
      --output=runs/tiny_store/tokenizer.model
  python -m llama_jax.data prepare --config=configs/tiny_store.py:raw \
      --tokenizer=runs/tiny_store/tokenizer.model --output=runs/stores --workers=2
  python -m llama_jax.train --config=configs/tiny_store.py --workdir=runs/tiny_store
"""

import pathlib

from llama_jax.config import base_config

STORES = "runs/stores"  # prepare's --output
WEIGHTS = {"code": 0.6, "prose": 0.3, "notes": 0.1}


def get_config(variant="store"):
    if variant not in ("store", "raw"):
        raise ValueError(f"configs/tiny_store.py:{variant} is unknown: use :store or :raw")
    c = base_config(vocab_size=4096, dim=256, n_layers=4, n_heads=4, ffn_dim=704,
                    max_seq_len=256, dtype="float32", remat="none")
    if variant == "raw":
        c.data.sources = [
            dict(name="code", weight=WEIGHTS["code"], builtin="code"),
            dict(name="prose", weight=WEIGHTS["prose"], builtin="prose"),
            dict(name="notes", weight=WEIGHTS["notes"], files="runs/notes/*.jsonl.gz",
                 format="jsonl")]
    else:
        c.data.sources = [dict(name=n, weight=w, store=str(pathlib.Path(STORES) / n))
                          for n, w in WEIGHTS.items()]
    c.data.update(seq_len=256, global_batch_size=8, tokenizer_vocab_size=4096,
                  tokenizer_sample_lines=300_000,
                  tokenizer_path="" if variant == "raw" else "runs/tiny_store/tokenizer.model")
    c.train.update(steps=300, lr=3e-3, log_every=20, eval_every=100, eval_batches=8)
    c.train.warmup_steps = c.train.get_ref("steps") // 10  # 10% of the run, as configs/tiny.py
    return c
