"""The token store: prepare (every input format, resume after a kill), the reader's batches as a
pure function of the step (the same bytes for any process count), the mixture, damaged shards,
and a kill -9 of a 2-process run resumed on 1 process with bit-identical losses."""

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard

from helpers import ROOT, micro_config, train_tokenizer
from llama_jax.data import corpus, prepare, store
from llama_jax.metrics import read_metrics

WEIGHTS = {"web": 0.6, "books": 0.3, "notes": 0.1}


def paragraphs(files):
    return [p for f in files for p in corpus.read_text(f).split("\n\n") if p.strip()]


def write_sources(root):
    """Three sources in three formats; `notes` is tiny (a few short lines)."""
    texts = paragraphs(corpus.stdlib_files("train")[40:70])
    web, books = texts[: len(texts) // 2], texts[len(texts) // 2:]
    for i, part in enumerate((web[::2], web[1::2])):
        lines = "".join(json.dumps({"id": n, "text": t}) + "\n" for n, t in enumerate(part))
        (root / f"web_{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
            lines.encode()))
    (root / "web_eval.jsonl").write_text(json.dumps({"text": "def f(x):\n    return x"}) + "\n")
    pq.write_table(pa.table({"content": books, "n": list(range(len(books)))}),
                   root / "books.parquet")
    notes = ["note one about lists", "", "note two: dicts", "third note, sets"]
    with gzip.open(root / "notes.txt.gz", "wt") as f:
        f.write("\n".join(notes) + "\n")
    entries = [
        dict(name="web", weight=WEIGHTS["web"], files=str(root / "web_*.jsonl.zst"),
             format="jsonl", eval_files=str(root / "web_eval.jsonl")),
        dict(name="books", weight=WEIGHTS["books"], files=str(root / "books.parquet"),
             format="parquet", field="content"),
        dict(name="notes", weight=WEIGHTS["notes"], files=str(root / "notes.txt.gz"),
             format="lines")]
    return entries, {"web": web, "books": books, "notes": [n for n in notes if n]}


def store_config(root, **data):
    config = micro_config()
    config.data.sources = [dict(name=n, weight=w, store=str(root / "stores" / n))
                           for n, w in WEIGHTS.items()]
    config.data.tokenizer_path = str(root / "tokenizer.model")
    config.data.update(data)
    return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    train_tokenizer(corpus.stdlib_files("train")[:40], 512, root / "tokenizer.model", 20_000)
    entries, texts = write_sources(root)
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
    tokenizer = (sp.serialized_model_proto(), str(root / "tokenizer.model"), sp.vocab_size())
    summaries = list(prepare.prepare(entries, str(root / "stores"), tokenizer, 0, 0.02))
    return {"root": root, "entries": entries, "texts": texts, "sp": sp, "tokenizer": tokenizer,
            "summaries": summaries}


def documents(path):
    """Every document of a store split, as token lists in store order."""
    s = store.Store(path)
    tokens = np.concatenate([s.shard_tokens(i) for i in range(len(s.manifest["shards"]))])
    return [tokens[a:a + n].tolist() for a, n in zip(s.doc_starts, s.lengths)]


def test_prepare_tokenizes_every_format_with_bos_and_eos(prepared):
    sp, root = prepared["sp"], prepared["root"]
    splits = {(s["source"], s["split"]) for s in prepared["summaries"]}
    assert splits == {("web", "train"), ("web", "validation"), ("books", "train"),
                      ("notes", "train")}
    for name, texts in prepared["texts"].items():
        want = [[1] + ids + [2] for ids in sp.encode(texts)]
        got = documents(f"{root}/stores/{name}/train")
        if name == "web":  # two files, one shard each: file 0 holds the even documents
            want = want[::2] + want[1::2]
        assert got == want, name
    manifest = json.loads((root / "stores/books/train/manifest.json").read_text())
    assert manifest["tokenizer"] == store.fingerprint(prepared["tokenizer"][0])
    assert manifest["format_version"] == 1 and manifest["dtype"] == "uint16"
    assert manifest["source"]["field"] == "content"
    assert all(s["tokens_per_s_per_worker"] for s in prepared["summaries"])


def test_a_killed_prepare_redoes_only_the_unfinished_shard(prepared, tmp_path):
    out = tmp_path / "stores"
    shutil.copytree(prepared["root"] / "stores", out)
    train = out / "web" / "train"
    before = (train / "manifest.json").read_bytes()
    # as a kill leaves it: shard 1 without its .json, a half-written temp file, no manifest
    (train / "shard_00001.json").unlink()
    (train / "shard_00001.tokens").rename(train / "shard_00001.tokens.tmp")
    (train / "shard_00001.tokens.tmp").write_bytes(b"half")
    (train / "manifest.json").unlink()
    summary = list(prepare.prepare(prepared["entries"][:1], str(out), prepared["tokenizer"], 1,
                                   0.02))  # in a worker process
    assert [s["shards_written"] for s in summary] == [1, 0]
    assert (train / "manifest.json").read_bytes() == before
    with pytest.raises(ValueError, match="prepared from another source or tokenizer"):
        other = dict(prepared["entries"][0], field="body")
        list(prepare.prepare([other], str(out), prepared["tokenizer"], 1, 0.02))


def mixture(prepared, seq_len=32, **data):
    config = store_config(prepared["root"], seq_len=seq_len, **data)
    return store.mixture(config.data, "train", prepared["tokenizer"][0])


def test_the_global_batch_is_the_same_bytes_for_1_2_and_4_processes(prepared):
    one = mixture(prepared)
    for step in (1, 2, 50, 126):  # 126: past the first 1,000-slot mixture block
        full = one.batch(step, 8, np.arange(8))
        for processes in (2, 4):
            fresh = mixture(prepared)  # a new reader (a restarted process) knows only the step
            rows = np.arange(8).reshape(processes, -1)
            parts = [fresh.batch(step, 8, r) for r in rows[::-1]][::-1]  # any order of calls
            for key, value in full.items():
                assert np.concatenate([p[key] for p in parts]).tobytes() == value.tobytes()
    assert one.batch(1, 8, np.arange(8))["inputs"].tobytes() != \
        one.batch(2, 8, np.arange(8))["inputs"].tobytes()


def test_mixture_shares_within_one_point_over_2000_sequences_with_a_tiny_source(prepared):
    mix = mixture(prepared)
    tokens = {name: 0 for name in WEIGHTS}
    for step in range(1, 251):  # 250 x 8 = 2,000 sequences
        batch = mix.batch(step, 8, np.arange(8), with_source=True)
        for name, source in zip(WEIGHTS, range(3)):
            tokens[name] += int((batch["segment_ids"][batch["source"] == source] > 0).sum())
    total = sum(tokens.values())
    for name, weight in WEIGHTS.items():
        assert abs(tokens[name] / total - weight) <= 0.01, (name, tokens)
    notes = mix.stores[2]
    assert 200 * 33 > 20 * notes.total_tokens  # the tiny source went round many epochs


def test_each_epoch_is_a_new_permutation_of_every_document(prepared):
    mix = mixture(prepared)
    source = 1  # books
    total = mix.stores[source].total_tokens
    rows = -(-2 * total // mix.row_len)
    tokens, doc_ids = mix.source_rows(source, np.arange(rows))
    tokens, doc_ids = tokens.ravel(), doc_ids.ravel()
    books = documents(f"{prepared['root']}/stores/books/train")
    epochs = []
    for epoch in (0, 1):
        part = tokens[epoch * total:(epoch + 1) * total]
        ids = doc_ids[epoch * total:(epoch + 1) * total]
        starts = np.flatnonzero(np.diff(ids, prepend=-1))
        docs = [part[a:b].tolist() for a, b in zip(starts, list(starts[1:]) + [total])]
        assert sorted(docs) == sorted(books)  # each document exactly once
        epochs.append(docs)
    assert epochs[0] != epochs[1]


def damaged(prepared, tmp_path, damage):
    out = tmp_path / "stores"
    shutil.copytree(prepared["root"] / "stores", out)
    shard = out / "books" / "train" / "shard_00000.tokens"
    damage(shard)
    config = store_config(tmp_path)
    config.data.tokenizer_path = prepared["tokenizer"][1]
    return shard, store.mixture(config.data, "train", prepared["tokenizer"][0])


@pytest.mark.parametrize("damage, problem", [
    (lambda p: p.write_bytes(p.read_bytes()[:-6]), "truncated"),
    (lambda p: p.write_bytes(b"\x07\x00" + p.read_bytes()[2:]), "fails its sha256 checksum"),
])
def test_a_damaged_shard_is_a_one_line_error_naming_it(prepared, tmp_path, damage, problem):
    shard, mix = damaged(prepared, tmp_path, damage)
    with pytest.raises(store.StoreError) as error:
        for step in range(1, 40):  # until a batch touches the books shard
            mix.batch(step, 8, np.arange(8))
    message = str(error.value)
    assert str(shard) in message and problem in message and "\n" not in message


def test_bad_store_settings_are_one_line_errors(prepared, tmp_path):
    config = store_config(prepared["root"])
    with pytest.raises(ValueError, match="was prepared with tokenizer .* but this run's is"):
        store.mixture(config.data, "train", b"another tokenizer")
    config.data.sources = list(config.data.sources) + [dict(name="code", builtin="code")]
    with pytest.raises(ValueError, match="mixes store= with other kinds"):
        store.store_run(config.data)
    config.data.sources = [dict(name="x", store=str(tmp_path / "missing"))]
    with pytest.raises(store.StoreError, match="manifest.json does not exist: run python -m"):
        store.mixture(config.data, "train", prepared["tokenizer"][0])


CONFIG = '''from llama_jax.config import base_config


def get_config():
    c = base_config(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                    max_seq_len=32, dtype="float32", remat="none")
    c.data.sources = {sources!r}
    c.data.update(tokenizer_path={tokenizer!r}, seq_len=32, global_batch_size=8,
                  tokenizer_vocab_size=512)
    c.train.update(steps=10_000, lr=3e-3, warmup_steps=1, log_every=1, eval_every=100_000,
                   eval_batches=1)
    c.checkpoint.update(every_steps=4, keep=10)
    return c
'''


def launch(config, workdir, processes, devices):
    command = [sys.executable, str(ROOT / "launch" / "local.py"), f"-n={processes}",
               f"--devices_per_process={devices}", "--grace_s=20", "--", sys.executable, "-m",
               "llama_jax.train", f"--config={config}", f"--workdir={workdir}"]
    # the launcher passes XLA_FLAGS on (conftest's: no LLVM optimisation of a few micro steps)
    return subprocess.Popen(command, cwd=ROOT, stdout=open(f"{workdir}.log", "w"),
                            stderr=subprocess.STDOUT)


def losses(workdir):
    if not (workdir / "metrics.jsonl").exists():
        return {0: None}
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r} or {0: None}


def committed(workdir):
    root = workdir / "checkpoints"
    return max([int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.exists()
               else [], default=0)


def run_until(job, workdir, done, stop=signal.SIGTERM):
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None and not done():
        time.sleep(0.05)
    log = open(f"{workdir}.log").read()
    if stop == signal.SIGKILL:  # every process of the job dies at once, as on a lost slice
        for pid in re.findall(r"\[launch\] process \d+ pid (\d+)", log):
            os.kill(int(pid), signal.SIGKILL)
    else:
        job.send_signal(stop)
    job.wait(timeout=120)
    return open(f"{workdir}.log").read()


@pytest.fixture(scope="module")
def killed(prepared):
    root = prepared["root"]
    config = root / "store_run.py"
    config.write_text(CONFIG.format(
        sources=[dict(name=n, weight=w, store=str(root / "stores" / n)) for n, w in
                 WEIGHTS.items()], tokenizer=str(root / "tokenizer.model")))
    # A: 2 processes x 2 devices, killed -9 between two checkpoints; beside it (the two cores
    # overlap their start-ups) R: 1 process x 4 devices, uninterrupted
    a, r = root / "a", root / "r"
    job_r = launch(config, r, 1, 4)
    log_a = run_until(launch(config, a, 2, 2), a, lambda: committed(a) >= 4 and max(
        losses(a)) > committed(a) + 1, signal.SIGKILL)
    saved, before = committed(a), losses(a)
    last = saved + 4
    run_until(job_r, r, lambda: max(losses(r)) >= last)
    # B: A's workdir resumed by 1 process x 4 devices
    log_b = run_until(launch(config, a, 1, 4), a, lambda: max(losses(a)) >= last)
    return {"saved": saved, "a": before, "log_a": log_a, "b": losses(a), "log_b": log_b,
            "r": losses(r), "last": last, "workdir": a}


def test_kill_9_of_2_processes_resumed_on_1_gives_bit_identical_losses(killed):
    saved, last = killed["saved"], killed["last"]
    assert max(killed["a"]) > saved, "killed after its last checkpoint's step"
    assert f"resumed from step {saved}" in killed["log_b"], killed["log_b"][-2000:]
    assert not (killed["workdir"] / "data_state").exists()  # a store run saves no data state
    later = range(saved + 1, last + 1)
    assert [killed["b"][s] for s in later] == [killed["r"][s] for s in later]
    redone = [s for s in killed["a"] if s > saved]  # steps A took, lost, and B took again
    assert [killed["a"][s] for s in redone] == [killed["r"][s] for s in redone]


def test_the_llama_mixture_has_a_store_variant():
    import importlib.util
    spec = importlib.util.spec_from_file_location("mixture", ROOT / "configs/data_llama_mixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    raw, stored = module.get_config(), module.get_config("store")
    assert [(e["name"], e["weight"]) for e in raw.data.sources] == \
        [(e["name"], e["weight"]) for e in stored.data.sources]
    assert stored.data.sources[0]["store"] == "gs://BUCKET/llama_data/stores/commoncrawl"
    assert store.store_run(stored.data) and not store.store_run(raw.data)


def test_prepare_reads_a_tfds_split_in_parts(prepared, tmp_path):
    import tensorflow_datasets as tfds
    entry = dict(name="tf", tfds="llama_jax_stdlib/code", split="train")
    with tfds.testing.mock_data(num_examples=3):
        summaries = list(prepare.prepare([entry], str(tmp_path), prepared["tokenizer"], 0, 0.02))
    assert [(s["split"], s["shards"]) for s in summaries] == [("train", prepare.TFDS_UNITS)]
    docs = documents(f"{tmp_path}/tf/train")
    assert docs and all(d[0] == 1 and d[-1] == 2 for d in docs)
