"""Tokenizers behind one interface: a SentencePiece model (tokenizer.model: LLaMA 1/2, and the
BPE this module trains) or a Hugging Face tokenizer.json (Llama 3's byte-level BPE).

Trained SentencePiece, LLaMA options: BPE, digits split into single digits, unknown UTF-8 falls
back to bytes; ids 0/1/2 are unk/bos/eos and there is no pad piece (padding uses segment id 0).
load_tokenizer picks the kind by file name; both answer encode, decode, pieces, vocab_size,
bos_id, eos_id and graph_encoder (the data pipeline's in-graph tokenization). As a program,
trains a SentencePiece model on a config's data mixture, or encodes/decodes text with either:

  python -m llama_jax.data.tokenizer train --config=configs/tiny.py --output=runs/tok/tokenizer.model
  python -m llama_jax.data.tokenizer encode --model=runs/tok/tokenizer.model "x = 2024"
  python -m llama_jax.data.tokenizer decode --model=runs/tok/tokenizer.model 1 87 3 2
  python -m llama_jax.data.tokenizer encode --model=Llama-3.1-8B/tokenizer.json "x = 2024"
"""

import io
import json
import os
import pathlib
import random
import shutil
import sys
import time

from absl import app, flags

from llama_jax import cli


def define_flags():
    """Defined only when run as a program, so tests can import every entry point at once."""
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "configs/*.py whose data.sources to train on.")
    flags.DEFINE_string("output", None, "train: where to write the .model file.")
    flags.DEFINE_string("model", None, "encode/decode: a .model file or a tokenizer.json.")


if __name__ == "__main__":  # --help and flag or config errors answer before JAX loads
    define_flags()
    cli.parse_flags()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402

from llama_jax import distributed, quiet  # noqa: E402


BOS_ID, EOS_ID = 1, 2  # of the SentencePiece models train_on_texts writes
FILE_NAMES = ("tokenizer.model", "tokenizer.json")  # in a workdir or model dir; first found wins
# special tokens of a tokenizer.json without a tokenizer_config.json beside it
HF_BOS_EOS = (("<|begin_of_text|>", "<|end_of_text|>"), ("<s>", "</s>"))


class SentencePieceTokenizer:
    """A SentencePiece .model (LLaMA 1/2's, or one train_on_texts wrote)."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.processor = spm.SentencePieceProcessor(model_file=str(path))

    def vocab_size(self):
        return self.processor.vocab_size()

    def bos_id(self):
        return self.processor.bos_id()

    def eos_id(self):
        return self.processor.eos_id()

    def encode(self, text):
        return self.processor.encode(text)

    def decode(self, ids):
        return self.processor.decode([int(i) for i in ids])

    def pieces(self, text):
        return self.processor.encode(text, out_type=str)

    def encode_documents(self, texts):
        """Each text's ids with BOS and EOS, a batch at a time (the token store's prepare)."""
        return self.processor.encode(list(texts), add_bos=True, add_eos=True)

    def graph_encoder(self):
        """A tf.data map function: string scalar -> int32 [n] ids with BOS and EOS, a native op."""
        with quiet.native_notices_filtered():  # the op logs that our identity normaliser is empty
            import tensorflow as tf
            import tensorflow_text as tf_text
            op = tf_text.SentencepieceTokenizer(
                model=self.processor.serialized_model_proto(), out_type=tf.int32, add_bos=True,
                add_eos=True)
        return op.tokenize


class HuggingFaceTokenizer:
    """A tokenizer.json; BOS/EOS come from tokenizer_config.json beside it (as transformers reads
    them), else from the special tokens Llama releases use. decode drops special tokens, as
    SentencePiece's does."""

    def __init__(self, path):
        from tokenizers import Tokenizer
        self.path = pathlib.Path(path)
        self.tokenizer = Tokenizer.from_file(str(path))
        self._bos, self._eos = self._special_ids()

    def _special_ids(self):
        config = self.path.with_name("tokenizer_config.json")
        if config.exists():
            fields = json.loads(config.read_text())
            named = [fields.get("bos_token"), fields.get("eos_token")]
            named = [t.get("content") if isinstance(t, dict) else t for t in named]
            candidates = [tuple(named)]
        else:
            candidates = HF_BOS_EOS
        for bos, eos in candidates:
            ids = self.tokenizer.token_to_id(bos or ""), self.tokenizer.token_to_id(eos or "")
            if None not in ids:
                return ids
        raise ValueError(f"{self.path} has no BOS/EOS tokens {candidates}: put a "
                         "tokenizer_config.json naming bos_token and eos_token beside it")

    def vocab_size(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def bos_id(self):
        return self._bos

    def eos_id(self):
        return self._eos

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def pieces(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def encode_documents(self, texts):
        """Each text's ids with BOS and EOS, a batch at a time (the token store's prepare)."""
        return [[self._bos] + e.ids + [self._eos] for e in
                self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def graph_encoder(self):
        """A tf.data map function: string scalar -> int32 [n] ids with BOS and EOS. The BPE runs
        in Python (tokenizers is Rust and has no TensorFlow op); it is deterministic, so the
        iterator checkpoint may ignore it (the dataset's external-state policy)."""
        import tensorflow as tf
        bos, eos = self._bos, self._eos

        def encode(text):
            return np.asarray([bos] + self.encode(text.decode("utf-8", errors="replace")) +
                              [eos], np.int32)

        def op(text):
            ids = tf.numpy_function(encode, [text], tf.int32, stateful=False)
            return tf.ensure_shape(ids, [None])
        return op


def tokenizer_file(directory) -> pathlib.Path:
    """A workdir's or model directory's tokenizer (tokenizer.model, else tokenizer.json); the
    tokenizer.model path when there is neither, for the caller's "missing" message."""
    for name in FILE_NAMES:
        if (pathlib.Path(directory) / name).exists():
            return pathlib.Path(directory) / name
    return pathlib.Path(directory) / FILE_NAMES[0]


def install(path, directory):
    """Copies a tokenizer into directory under its kind's name (with a tokenizer.json, the
    tokenizer_config.json beside it that names BOS/EOS); returns the copy's path."""
    path, directory = pathlib.Path(path), pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = FILE_NAMES[1] if path.suffix == ".json" else FILE_NAMES[0]
    extras = [path.with_name("tokenizer_config.json")] if path.suffix == ".json" else []
    for source, target in [(path, name)] + [(e, e.name) for e in extras if e.exists()]:
        if (directory / target).resolve() != source.resolve():
            tmp = directory / (target + ".tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, directory / target)  # complete or absent, never half-written
    return directory / name


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


def load_tokenizer(path, model_vocab_size: int):
    """A tokenizer.json (Hugging Face) or SentencePiece .model, checked against the model."""
    path = pathlib.Path(path)
    kind = HuggingFaceTokenizer if path.suffix == ".json" else SentencePieceTokenizer
    try:
        tokenizer = kind(path)
    except ValueError:
        raise  # it already says the fix (a tokenizer.json without BOS/EOS)
    except Exception as e:  # sentencepiece raises OSError/RuntimeError, tokenizers Exception
        raise ValueError(f"tokenizer {path} cannot be read ({e}): give a SentencePiece .model "
                         "or a Hugging Face tokenizer.json (delete a cached one to train a new "
                         "one, with a new --workdir)") from e
    check_fits(tokenizer.vocab_size(), model_vocab_size, f"tokenizer {path}")
    return tokenizer


def shared_tokenizer(workdir, data_config, model_vocab_size: int):
    """get_tokenizer for every process of a job: process 0 puts the tokenizer into a fresh
    workdir (trained, or copied from data.tokenizer_path) while the others wait, then all read
    it."""
    workdir = pathlib.Path(workdir)
    if jax.process_count() > 1:
        first = jax.process_index() == 0
        tokenizer = get_tokenizer(workdir, data_config, model_vocab_size) if first else None
        distributed.barrier("tokenizer")
        if first:
            return tokenizer
        if not tokenizer_file(workdir).exists():
            raise OSError(f"process {jax.process_index()} cannot see the tokenizer in {workdir} "
                          "that process 0 wrote: --workdir must be a directory every process "
                          "shares (a bucket mount, NFS)")
    return get_tokenizer(workdir, data_config, model_vocab_size)


def get_tokenizer(workdir, data_config, model_vocab_size: int):
    """The workdir's tokenizer: data.tokenizer_path copied in (a SentencePiece .model or a
    tokenizer.json) if set, else the cached one, trained on the train split of data.sources if
    absent. The workdir keeps it, so generate and evaluate find the tokenizer it trained with."""
    check_fits(data_config.tokenizer_vocab_size, model_vocab_size, "data.tokenizer_vocab_size")
    workdir = pathlib.Path(workdir)
    if data_config.tokenizer_path:
        given = load_tokenizer(data_config.tokenizer_path, model_vocab_size)
        cached = tokenizer_file(workdir)
        if not cached.exists():
            return load_tokenizer(install(given.path, workdir), model_vocab_size)
        if cached.read_bytes() != given.path.read_bytes():
            raise ValueError(f"{cached} differs from data.tokenizer_path={given.path}: a workdir "
                             "keeps the tokenizer it started with; use a new --workdir")
        return load_tokenizer(cached, model_vocab_size)
    path = tokenizer_file(workdir)
    if not path.exists():
        texts = source_texts(data_config, data_config.tokenizer_sample_lines)
        train_on_texts(texts, data_config.tokenizer_vocab_size, path,
                       data_config.tokenizer_sample_lines, data_config.seed)
    return load_tokenizer(path, model_vocab_size)


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
        try:
            texts = source_texts(data, data.tokenizer_sample_lines)
            train_on_texts(texts, data.tokenizer_vocab_size, flag.output,
                           data.tokenizer_sample_lines, data.seed)
        except (ValueError, OSError) as e:  # a source or --output the fix is named for
            sys.exit(f"error: {e}")
        print(json.dumps({"output": flag.output, "vocab_size": data.tokenizer_vocab_size,
                          "seconds": round(time.time() - start, 1)}))
        return
    if flag.model is None or not args:
        raise app.UsageError(f"{command} needs --model and arguments; " + usage)
    try:
        sp = load_tokenizer(flag.model, model_vocab_size=2**31)
    except (ValueError, OSError) as e:  # not a tokenizer file, or none there
        sys.exit(f"error: --model={flag.model}: {e}")
    if command == "encode":
        text = " ".join(args)
        print(json.dumps({"ids": sp.encode(text), "pieces": sp.pieces(text)}))
    else:
        try:
            ids = [int(a) for a in args]
        except ValueError:
            raise app.UsageError(f"decode takes integer ids, got {args}") from None
        print(json.dumps({"text": sp.decode(ids)}))


if __name__ == "__main__":
    cli.run(main)
