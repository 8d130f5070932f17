"""Tokenizer tools: train a LLaMA-style SentencePiece model on a config's data mixture, and
encode/decode text to inspect it.

  python -m llama_jax.tokenizer train --config=configs/tiny.py --output=runs/tok/tokenizer.model
  python -m llama_jax.tokenizer encode --model=runs/tok/tokenizer.model "x = 2024"
  python -m llama_jax.tokenizer decode --model=runs/tok/tokenizer.model 1 87 3 2
"""

import json
import time

from absl import app, flags
from ml_collections import config_flags

from llama_jax.data import tokenizer

config_flags.DEFINE_config_file("config", None, "configs/*.py whose data.sources to train on.")
flags.DEFINE_string("output", None, "train: where to write the .model file.")
flags.DEFINE_string("model", None, "encode/decode: a trained .model file.")


def main(argv):
    usage = ("usage: python -m llama_jax.tokenizer train --config=C --output=PATH | "
             "encode --model=PATH TEXT... | decode --model=PATH ID...")
    if len(argv) < 2 or argv[1] not in ("train", "encode", "decode"):
        raise app.UsageError(usage)
    command, args = argv[1], argv[2:]
    flag = flags.FLAGS
    if command == "train":
        if flag.config is None or flag.output is None or args:
            raise app.UsageError("train needs --config and --output and no arguments; " + usage)
        data = flag.config.data
        start = time.time()
        texts = tokenizer.source_texts(data, data.tokenizer_sample_lines)
        tokenizer.train_on_texts(texts, data.tokenizer_vocab_size, flag.output,
                                 data.tokenizer_sample_lines, data.seed)
        print(json.dumps({"output": flag.output, "vocab_size": data.tokenizer_vocab_size,
                          "seconds": round(time.time() - start, 1)}))
        return
    if flag.model is None or not args:
        raise app.UsageError(f"{command} needs --model and arguments; " + usage)
    sp = tokenizer.load_tokenizer(flag.model, model_vocab_size=2**31)
    if command == "encode":
        text = " ".join(args)
        print(json.dumps({"ids": sp.encode(text), "pieces": sp.encode(text, out_type=str)}))
    else:
        try:
            ids = [int(a) for a in args]
        except ValueError:
            raise app.UsageError(f"decode takes integer ids, got {args}") from None
        print(json.dumps({"text": sp.decode(ids)}))


if __name__ == "__main__":
    app.run(main)
