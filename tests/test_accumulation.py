"""Gradient accumulation (train.microbatches): the same step as the batch in one piece, one
microbatch's memory, one compile, exact resume, and one-line config errors."""

import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import micro_config, random_batch
from llama_jax import parallel, ranges, sharding, train as train_lib, train_step
from llama_jax.config import validate
from llama_jax.metrics import read_metrics

MESHES = [
    ({"data": 1, "fsdp": 1, "tensor": 1}, "fsdp"),
    ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"),
    # 2 fake slices: each accumulates its own gradient, summed across them after the last one
    ({"slices": 2, "data": 1, "fsdp": 4, "tensor": 1}, "fsdp"),
    ({"slices": 2, "data": 1, "fsdp": 2, "tensor": 2}, "fsdp_tp"),
]


def make_mesh(mesh_config):
    return sharding.make_mesh(mesh_config, jax.devices()[:int(np.prod(list(
        mesh_config.values())))])


def packed_batch(key, batch_size, seq_len, vocab):
    """Two documents per row (the boundary moves from row to row) and a loss mask whose zeros
    differ per row, so microbatches hold different numbers of counted tokens."""
    batch = random_batch(key, batch_size, seq_len, vocab)
    rows = jnp.arange(batch_size)[:, None]
    cols = jnp.arange(seq_len)[None, :]
    boundary = 5 + rows * 3 % (seq_len - 10)  # [B, 1]
    second = cols >= boundary
    batch["segment_ids"] = jnp.where(second, 2, 1).astype(jnp.int32)
    batch["positions"] = jnp.where(second, cols - boundary, cols).astype(jnp.int32)
    masked = cols < (rows * 7 % 23)  # 0..22 leading positions masked, a different count per row
    batch["loss_mask"] = jnp.where(masked, 0.0, 1.0).astype(jnp.float32)
    return batch


def run(config, mesh, batches):
    """(final params, per-step metrics, the eval step's output on the first batch after the
    steps, the jitted train step)."""
    step = train_step.build(config, mesh)
    state = step.init(jax.random.key(0))
    batches = [jax.device_put(b, sharding.batch_sharding(mesh)) for b in batches]
    history = []
    for batch in batches:
        state, metrics = step.train_step(state, batch)
        history.append(jax.device_get(metrics))
    evaluated = jax.device_get(step.eval_step(state.params, batches[0]))
    return jax.device_get(state.params), history, evaluated, step.train_step


@pytest.mark.parametrize("mesh_config, rules", MESHES, ids=["1dev", "fsdp8", "dp2_fsdp2_tp2",
                                                            "2slices_fsdp4", "2slices_fsdp2_tp2"])
def test_microbatches_match_the_batch_in_one_piece(mesh_config, rules):
    """4 microbatches give the one-piece step's loss, norms and parameters after 3 steps, with
    packed documents and microbatches of unequal token counts; the step compiles once, and the
    eval step (microbatched too) gives the same summed loss."""
    config = micro_config()
    config.sharding_rules = rules
    config.data.global_batch_size = 32  # 4 microbatches x 8 batch shards
    keys = jax.random.split(jax.random.key(0), 3)
    data = [packed_batch(k, 32, config.data.seq_len, config.model.vocab_size) for k in keys]
    counts = data[0]["loss_mask"].reshape(8, 4, -1).sum(axis=(0, 2))  # microbatch m: rows i*4+m
    assert len(set(counts.tolist())) > 1, counts  # the token-count weighting matters
    mesh = make_mesh(mesh_config)
    want_params, want, want_eval, _ = run(config, mesh, data)
    config.train.microbatches = 4
    got_params, got, got_eval, jitted = run(config, mesh, data)
    for w, g in zip(want, got):
        assert float(g["tokens"]) == float(w["tokens"])
        assert float(g["finite"]) == 1.0
        for key in ("loss", "grad_norm", "update_norm", "param_norm"):
            assert abs(float(g[key]) - float(w[key])) <= 1e-5 * abs(float(w[key])), key
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5,
                                                         atol=1e-5 * np.abs(w).max()),
                 got_params, want_params)
    assert jitted._cache_size() == 1  # compiled once for all three steps
    assert float(got_eval["tokens"]) == float(want_eval["tokens"])  # and evaluation agrees
    np.testing.assert_allclose(got_eval["loss_sum"], want_eval["loss_sum"], rtol=1e-5)


def test_each_microbatch_is_spread_over_every_batch_device_without_moving_rows():
    """Microbatch m is global rows m, m+N, m+2N, ...: every device holds B/(N*shards) rows of
    each microbatch, all of them rows it already had, so the split needs no communication."""
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    n, rows = 4, 64
    batch = {"inputs": jax.device_put(jnp.arange(rows)[:, None].repeat(3, 1),
                                      sharding.batch_sharding(mesh))}
    micro_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        None, sharding.BATCH))
    split = jax.jit(lambda b: parallel.split_microbatches(b, n, micro_sharding))
    out = split(batch)["inputs"]  # [N, B/N, T]
    np.testing.assert_array_equal(out[:, :, 0], np.arange(rows).reshape(rows // n, n).T)
    had = {s.device: set(np.asarray(s.data)[:, 0].tolist())
           for s in batch["inputs"].addressable_shards}
    for shard in out.addressable_shards:
        held = np.asarray(shard.data)[:, :, 0]  # [N, B/(N*shards)]
        assert held.shape == (n, rows // n // 8)
        assert set(held.ravel().tolist()) <= had[shard.device]
    hlo = split.lower(batch).compile().as_text()
    assert not any(op in hlo for op in ("all-to-all", "all-gather", "collective-permute"))


def temporaries(microbatches, per_device=2):
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    config = micro_config()
    config.data.global_batch_size = per_device * 8 * microbatches
    config.train.microbatches = microbatches
    step = train_step.build(config, mesh)
    compiled = step.train_step.lower(step.abstract, step.abstract_batch()).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_is_one_microbatchs():
    """8 microbatches of 2 sequences per device need the temporaries of one such batch, not 8x:
    what the microbatch loop adds is parameter-sized and the same for 2 microbatches as for 8.
    Measured on this CPU (jax 0.10.2, micro model, 8 fake devices, fsdp=8): 1 microbatch
    (no loop) 1,716,888 bytes, 2 microbatches 2,148,056, 8 microbatches 2,155,736; the same
    16 sequences per device in one piece 10,222,744. The loop's 431 kB was 14 kB before the
    embedding table was gathered for its lookup (when 1 microbatch took 6,022,848 bytes), so
    most of it is copies of that table, 131 kB in float32: 23% of the micro model's
    parameters, 2% of 7B's."""
    one, two, eight = temporaries(1), temporaries(2), temporaries(8)
    whole = temporaries(1, per_device=16)
    print(f"temporaries: 1 microbatch {one:,} B, 2 microbatches {two:,} B, 8 microbatches "
          f"{eight:,} B, the 8x batch in one piece {whole:,} B")
    assert abs(eight - two) <= 0.02 * two, (two, eight)  # nothing grows with the count
    table = 4 * 512 * 64
    assert eight - one <= 4 * table, (one, eight)  # parameter-sized, not activations
    assert whole > 4 * eight, (whole, eight)  # what accumulation saves


def test_resume_with_microbatches_gives_bit_identical_losses(tmp_path, monkeypatch):
    """A run with train.microbatches=2 stopped after step 5 (its last checkpoint: step 3) and
    rerun gives, at each of its 8 steps, the uninterrupted run's loss bit for bit."""
    config = micro_config()
    config.train.update(steps=8, warmup_steps=1, log_every=1, eval_every=100, eval_batches=1,
                        microbatches=2)
    config.data.global_batch_size = 16  # 2 microbatches x 8 devices
    config.checkpoint.every_steps = 3
    train_lib.train(config, tmp_path / "a")
    (tmp_path / "b").mkdir()  # same tokenizer, so the comparison is about resume only
    shutil.copy(tmp_path / "a" / "tokenizer.model", tmp_path / "b" / "tokenizer.model")

    before = train_lib.Profile.before

    def crash_at_step_6(self, n):
        if n == 6:
            raise RuntimeError("simulated crash")
        before(self, n)

    with monkeypatch.context() as patch:
        patch.setattr(train_lib.Profile, "before", crash_at_step_6)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_lib.train(config, tmp_path / "b")
    assert max(r["step"] for r in read_metrics(tmp_path / "b")) == 5
    summary = train_lib.train(config, tmp_path / "b")
    assert summary["first_step"] == 3  # resumed from the checkpoint, steps 4 and 5 rerun

    def losses(workdir):
        return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert a == b  # bit-identical floats, including every step after the resume


@pytest.mark.parametrize("microbatches, batch, message", [
    (0, 8, r"train\.microbatches=0 is outside its range integer >= 1"),
    (-2, 8, r"train\.microbatches=-2 is outside its range integer >= 1"),
    (True, 8, r"train\.microbatches=True is outside its range integer >= 1"),
    (2, 8, r"data\.global_batch_size=8 is not divisible by train\.microbatches=2 x mesh "
           r"slices\*data\*fsdp=8: make it a multiple of 16"),
    (3, 16, r"data\.global_batch_size=16 is not divisible by train\.microbatches=3 x mesh "
            r"slices\*data\*fsdp=8: make it a multiple of 24"),
])
def test_bad_microbatches_are_one_line_errors(microbatches, batch, message):
    config = micro_config()
    config.data.global_batch_size = batch
    config.train.microbatches = microbatches
    with pytest.raises(ValueError) as raised:  # what a step builder's entry point checks
        ranges.check_config(config)
        validate(config, make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
    assert len(str(raised.value).splitlines()) == 1
    assert re.search(message, str(raised.value)), str(raised.value)
    config = micro_config()
    config.data.global_batch_size = 8 * 4
    config.train.microbatches = 4  # accepted: each microbatch is one sequence per device
    validate(config, make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
