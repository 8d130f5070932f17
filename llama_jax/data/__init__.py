"""Input: sources (built-in corpus, local files, TFDS), the tokenizers (SentencePiece or a
Hugging Face tokenizer.json) and the tf.data pipeline (in-graph tokenization, packing, mixing,
checkpointable iterator)."""

# the formats a files= source may name (parquet and .zst files: prepare reads them); here, not in
# sources.py, so that checking a config (ranges.py) does not import TensorFlow
FORMATS = ("text", "lines", "jsonl", "parquet")
