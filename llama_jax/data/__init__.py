"""Input: sources (built-in corpus, local files, TFDS), the tokenizers (SentencePiece or a
Hugging Face tokenizer.json) and the tf.data pipeline (in-graph tokenization, packing, mixing,
checkpointable iterator)."""
