"""SentencePiece BPE with the LLaMA settings, trained on the corpus on first use and cached.

LLaMA options: BPE, digits split into single digits, unknown UTF-8 falls back to bytes;
ids 0/1/2 are unk/bos/eos and there is no pad piece (padding uses segment id 0 instead).
"""

import io
import os
import pathlib
import random

import sentencepiece as spm

from llama_jax.data import corpus

BOS_ID, EOS_ID = 1, 2


def train_tokenizer(files, vocab_size: int, out_path, sample_lines: int = 2_000_000, seed=0):
    """Trains on up to sample_lines lines of the files; writes out_path atomically."""
    texts = (corpus.read_text(f) for f in files)
    train_on_texts(texts, vocab_size, out_path, sample_lines, seed)


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
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines[:sample_lines]), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
        character_coverage=0.99995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        max_sentence_length=16384, unk_id=0, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_path)  # a killed run never leaves a half-written tokenizer behind


def load_tokenizer(path, model_vocab_size: int) -> spm.SentencePieceProcessor:
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"tokenizer {path} cannot be read ({e}): delete it to train a new one "
                         "(a new tokenizer needs a new --workdir)") from e
    if sp.vocab_size() > model_vocab_size:
        raise ValueError(f"tokenizer {path} has {sp.vocab_size()} pieces but model.vocab_size is "
                         f"{model_vocab_size}: raise model.vocab_size or use a smaller tokenizer")
    return sp


def get_tokenizer(workdir, data_config, model_vocab_size: int) -> spm.SentencePieceProcessor:
    """data.tokenizer_path if set, else the workdir's cached tokenizer, trained on the train
    split of data.sources if absent."""
    if data_config.tokenizer_vocab_size > model_vocab_size:
        raise ValueError(f"data.tokenizer_vocab_size={data_config.tokenizer_vocab_size} exceeds "
                         f"model.vocab_size={model_vocab_size}: the model could not embed every "
                         "token")
    if data_config.tokenizer_path:
        return load_tokenizer(data_config.tokenizer_path, model_vocab_size)
    path = pathlib.Path(workdir) / "tokenizer.model"
    if not path.exists():
        texts = source_texts(data_config, data_config.tokenizer_sample_lines)
        train_on_texts(texts, data_config.tokenizer_vocab_size, path,
                       data_config.tokenizer_sample_lines, data_config.seed)
    return load_tokenizer(path, model_vocab_size)
