"""Input: sources (built-in corpus, local files, TFDS), the SentencePiece tokenizer and the
tf.data pipeline (in-graph tokenization, packing, mixing, checkpointable iterator)."""
