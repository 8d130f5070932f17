"""LLaMA-7B on the paper's pretraining mixture (Table 1): seven sources, sampling proportions.

Point DATA at your copies (a local path or gs://bucket/...): TFDS datasets prepared under
DATA/tfds, the rest as JSON lines. Train the tokenizer on this mixture once, then train:
  python -m llama_jax.data.tokenizer train --config=configs/data_llama_mixture.py \
      --output=gs://BUCKET/llama_mix/tokenizer.model
  python -m llama_jax.train --config=configs/data_llama_mixture.py \
      --config.data.tokenizer_path=gs://BUCKET/llama_mix/tokenizer.model \
      --workdir=gs://BUCKET/llama_mix
Meant for a TPU v5p-64 slice or 8x8 H100, like configs/llama_7b.py.

The store variant (`:store`) reads the same mixture from token stores that prepare wrote once
(docs/data.md), so no host tokenizes and a resume on any process count replays the stream:
  python -m llama_jax.data prepare --config=configs/data_llama_mixture.py \
      --tokenizer=gs://BUCKET/llama_mix/tokenizer.model --output=gs://BUCKET/llama_data/stores
  python -m llama_jax.train --config=configs/data_llama_mixture.py:store \
      --config.data.tokenizer_path=gs://BUCKET/llama_mix/tokenizer.model \
      --workdir=gs://BUCKET/llama_mix
"""

from llama_jax.config import base_config

DATA = "gs://BUCKET/llama_data"


def sources(data=DATA):
    """The seven sources; weights are the paper's sampling proportions (they sum to 1)."""
    tfds_dir = f"{data}/tfds"
    return [
        # CCNet-filtered CommonCrawl dumps have no TFDS build: JSON lines with a "raw_content" key
        dict(name="commoncrawl", weight=0.670, files=f"{data}/commoncrawl/*.jsonl",
             format="jsonl", field="raw_content"),
        dict(name="c4", weight=0.150, tfds="c4/en:3.1.0", data_dir=tfds_dir, split="train",
             eval_split="validation", field="text"),
        dict(name="github", weight=0.045, files=f"{data}/github/*.jsonl", format="jsonl",
             field="content"),
        dict(name="wikipedia", weight=0.045, tfds="wikipedia/20230601.en", data_dir=tfds_dir,
             split="train", field="text"),
        dict(name="books", weight=0.045, tfds="pg19:0.1.1", data_dir=tfds_dir, split="train",
             eval_split="validation", field="book_text"),
        dict(name="arxiv", weight=0.025, files=f"{data}/arxiv/*.jsonl", format="jsonl",
             field="text"),
        dict(name="stackexchange", weight=0.020, files=f"{data}/stackexchange/*.jsonl",
             format="jsonl", field="text"),
    ]


def store_sources(stores=f"{DATA}/stores"):
    """sources() as prepare's stores (STORES/NAME), with the same weights."""
    return [dict(name=e["name"], weight=e["weight"], store=f"{stores}/{e['name']}")
            for e in sources()]


def get_config(variant=None):
    if variant not in (None, "store"):
        raise ValueError(f"configs/data_llama_mixture.py:{variant} is unknown: use :store or "
                         "nothing")
    c = base_config(dim=4096, n_heads=32, n_layers=32)
    c.data.sources = store_sources() if variant == "store" else sources()
    c.train.lr = 0.0003
    c.train.steps = 238418  # 1.0T tokens / (2048 x 2048 tokens a step)
    return c
