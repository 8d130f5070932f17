"""SentencePiece BPE with the LLaMA settings, trained on the corpus on first use and cached.

LLaMA options: BPE, digits split into single digits, unknown UTF-8 falls back to bytes;
ids 0/1/2 are unk/bos/eos and there is no pad piece (padding uses segment id 0 instead).
As a program, trains one on a config's data mixture, or encodes/decodes text to inspect it:

  python -m llama_jax.data.tokenizer train --config=configs/tiny.py --output=runs/tok/tokenizer.model
  python -m llama_jax.data.tokenizer encode --model=runs/tok/tokenizer.model "x = 2024"
  python -m llama_jax.data.tokenizer decode --model=runs/tok/tokenizer.model 1 87 3 2
"""

import io
import json
import os
import pathlib
import random
import time

import jax
import sentencepiece as spm
from absl import app, flags

from llama_jax import distributed

BOS_ID, EOS_ID = 1, 2


def source_texts(data_config, sample_lines: int):
    """Documents from the train split of config.data.sources, each source contributing lines in
    proportion to its weight, so the vocabulary reflects the mixture the model trains on."""
    from llama_jax.data import pipeline, sources  # tensorflow is only needed for this path
    entries = [dict(e) for e in data_config.sources]
    for index, (entry, weight) in enumerate(zip(entries, pipeline.mixture_weights(entries))):
        docs = sources.documents(entry, "train", train=True, seed=data_config.seed + index,
                                 validation_fraction=data_config.validation_fraction,
                                 process_index=0, process_count=1)
        budget = int(weight * sample_lines)
        for doc in docs.as_numpy_iterator():
            if budget <= 0:
                break
            text = doc.decode("utf-8", errors="replace")
            budget -= text.count("\n") + 1
            yield text


def train_on_texts(texts, vocab_size: int, out_path, sample_lines: int = 2_000_000, seed=0):
    """Trains on up to sample_lines non-blank lines of the texts; writes out_path atomically."""
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines[:sample_lines]), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
            character_coverage=0.99995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            max_sentence_length=16384, unk_id=0, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:  # e.g. fewer pieces than the corpus has characters
        raise ValueError(f"SentencePiece cannot train {vocab_size} pieces on this corpus "
                         f"({str(e).splitlines()[-1][:200]}): change data.tokenizer_vocab_size")

    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_path)  # a killed run never leaves a half-written tokenizer behind


def check_fits(pieces: int, model_vocab_size: int, what: str):
    """The one tokenizer-vs-model check: every id a tokenizer emits must have an embedding row."""
    if pieces > model_vocab_size:
        raise ValueError(f"{what} has {pieces} pieces but model.vocab_size is {model_vocab_size}:"
                         " the model could not embed every token; raise model.vocab_size or "
                         "use a smaller tokenizer")


def load_tokenizer(path, model_vocab_size: int) -> spm.SentencePieceProcessor:
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"tokenizer {path} cannot be read ({e}): delete it to train a new one "
                         "(a new tokenizer needs a new --workdir)") from e
    check_fits(sp.vocab_size(), model_vocab_size, f"tokenizer {path}")
    return sp


def shared_tokenizer(workdir, data_config, model_vocab_size: int):
    """get_tokenizer for every process of a job: process 0 trains the tokenizer of a fresh
    workdir while the others wait, then all read it."""
    workdir = pathlib.Path(workdir)
    if jax.process_count() > 1 and not data_config.tokenizer_path:
        if jax.process_index() == 0:
            get_tokenizer(workdir, data_config, model_vocab_size)
        distributed.barrier("tokenizer")
        if not (workdir / "tokenizer.model").exists():
            raise OSError(f"process {jax.process_index()} cannot see {workdir}/tokenizer.model "
                          "that process 0 wrote: --workdir must be a directory every process "
                          "shares (a bucket mount, NFS), or set data.tokenizer_path")
    return get_tokenizer(workdir, data_config, model_vocab_size)


def get_tokenizer(workdir, data_config, model_vocab_size: int) -> spm.SentencePieceProcessor:
    """data.tokenizer_path if set, else the workdir's cached tokenizer, trained on the train
    split of data.sources if absent."""
    check_fits(data_config.tokenizer_vocab_size, model_vocab_size, "data.tokenizer_vocab_size")
    if data_config.tokenizer_path:
        return load_tokenizer(data_config.tokenizer_path, model_vocab_size)
    path = pathlib.Path(workdir) / "tokenizer.model"
    if not path.exists():
        texts = source_texts(data_config, data_config.tokenizer_sample_lines)
        train_on_texts(texts, data_config.tokenizer_vocab_size, path,
                       data_config.tokenizer_sample_lines, data_config.seed)
    return load_tokenizer(path, model_vocab_size)


def define_flags():
    """Defined only when run as a program, so tests can import every entry point at once."""
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "configs/*.py whose data.sources to train on.")
    flags.DEFINE_string("output", None, "train: where to write the .model file.")
    flags.DEFINE_string("model", None, "encode/decode: a trained .model file.")


def main(argv):
    usage = ("usage: python -m llama_jax.data.tokenizer train --config=C --output=PATH | "
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
        texts = source_texts(data, data.tokenizer_sample_lines)
        train_on_texts(texts, data.tokenizer_vocab_size, flag.output,
                                 data.tokenizer_sample_lines, data.seed)
        print(json.dumps({"output": flag.output, "vocab_size": data.tokenizer_vocab_size,
                          "seconds": round(time.time() - start, 1)}))
        return
    if flag.model is None or not args:
        raise app.UsageError(f"{command} needs --model and arguments; " + usage)
    sp = load_tokenizer(flag.model, model_vocab_size=2**31)
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
    define_flags()
    app.run(main)
