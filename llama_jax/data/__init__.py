"""Input: the built-in corpus, the SentencePiece tokenizer and the tf.data pipeline."""
