"""Context parallelism: the sequence split over the `context` mesh axis, its tokens
load-balanced (parallel.balance), gives the losses, gradients and training steps of the
one-device run (float32, the xla attention path, packed documents)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import micro_config, random_batch
from llama_jax import checkpoint, compile as compile_lib, parallel, sharding, train_step
from llama_jax.config import validate


def packed_batch(key, config):
    """Rows of three documents of uneven lengths (a different split in each row), positions
    restarting in each and no target across a boundary, as the data pipeline packs them."""
    b, t = config.data.global_batch_size, config.data.seq_len
    batch = random_batch(key, b, t, config.model.vocab_size)
    index = np.arange(t)
    ends = [(3 + 2 * r, 17 + r) for r in range(b)]  # two boundaries per row
    segments = np.stack([1 + (index >= e1) + (index >= e2) for e1, e2 in ends]).astype(np.int32)
    starts = np.stack([np.where(index >= e2, e2, np.where(index >= e1, e1, 0)) for e1, e2 in ends])
    mask = np.ones((b, t), np.float32)
    for r, (e1, e2) in enumerate(ends):
        mask[r, [e1 - 1, e2 - 1]] = 0.0  # the target is the next document's first token
    batch.update(segment_ids=jnp.asarray(segments), positions=jnp.asarray(index - starts),
                 loss_mask=jnp.asarray(mask))
    return batch


def build(mesh_config, rules="fsdp", chunk=0, microbatches=1):
    config = micro_config()
    config.mesh.update({**{a: 1 for a in sharding.MESH_AXES}, **mesh_config})
    config.sharding_rules = rules
    config.train.update(loss_chunk_size=chunk, microbatches=microbatches)
    size = int(np.prod(list(config.mesh.values())))
    return config, train_step.build(config, sharding.make_mesh(config.mesh,
                                                               jax.devices()[:size]))


def run(step, state, batches, steps=True):
    """(mean loss and grads of the first batch through parallel.gradients, as the train step
    gets them; the metrics of a train step on each batch, or none), from `state` (the one-device
    run's, placed on this mesh: one init compiled for all)."""
    loss_of = lambda p, b: train_step.summed_loss(p, b, step.model,
                                                  step.config.train.loss_chunk_size)
    fn = lambda p, b: parallel.gradients(loss_of, p, b, step.plan)
    fn = jax.jit(sharding.traced_under(step.mesh, step.config.sharding_rules, fn),
                 in_shardings=(step.shardings.params, sharding.batch_sharding(step.mesh)))
    place = lambda batch: jax.device_put(batch, sharding.batch_sharding(step.mesh))
    state = jax.device_put(state, step.shardings)
    loss, _, grads = fn(state.params, place(batches[0]))
    history = []
    for batch in batches if steps else ():
        state, metrics = step.train_step(state, place(batch))
        history.append(jax.device_get(metrics))
    return (float(loss), jax.device_get(grads)), history


@pytest.fixture(scope="module")
def data():
    config = micro_config()
    return [packed_batch(k, config) for k in jax.random.split(jax.random.key(1), 3)]


@pytest.fixture(scope="module")
def reference(data):
    """The one-device run: its initial state (host copy), first-batch loss and grads, 3 steps."""
    _, step = build({sharding.FSDP: 1}, chunk=4)
    assert step.mesh.size == 1
    state = jax.device_get(step.init(jax.random.key(0)))
    return (state, *run(step, state, data))


@pytest.mark.parametrize("mesh_config, rules, chunk, microbatches, steps", [
    ({sharding.FSDP: 4, sharding.CONTEXT: 2}, "fsdp", 4, 1, True),
    ({sharding.FSDP: 2, sharding.CONTEXT: 4}, "fsdp", 0, 1, False),
    ({sharding.DATA: 2, sharding.CONTEXT: 4}, "fsdp", 4, 2, False),  # 2 microbatches
    ({sharding.SLICES: 2, sharding.CONTEXT: 2, sharding.TENSOR: 2}, "fsdp_tp", 4, 2, False),
])
def test_context_parallel_losses_gradients_and_steps_match_one_device(
        data, reference, mesh_config, rules, chunk, microbatches, steps):
    state, (want_loss, want_grads), want_steps = reference
    _, step = build(mesh_config, rules, chunk, microbatches)
    assert step.plan.context == mesh_config[sharding.CONTEXT]
    # the sequence is split: every weight over fsdp x context, the batch's tokens over context
    wq = step.shardings.params["layers"]["attention"]["wq"].spec
    assert sharding.CONTEXT in wq[1] and sharding.batch_sharding(step.mesh).spec[1] == \
        sharding.CONTEXT
    (loss, grads), got_steps = run(step, state, data, steps)
    assert abs(loss - want_loss) <= 1e-5 * abs(want_loss)
    jax.tree.map(lambda w, g: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6),
                 want_grads, grads)
    for want, got in zip(want_steps, got_steps):
        for key in ("loss", "grad_norm", "param_norm", "update_norm"):
            assert abs(float(want[key]) - float(got[key])) <= 1e-5 * abs(float(want[key])), key
    assert len(got_steps) == (3 if steps else 0)


def test_evaluation_with_context_matches_one_device(data, reference):
    state, (want_loss, _), _ = reference
    _, step = build({sharding.FSDP: 2, sharding.CONTEXT: 4}, chunk=4, microbatches=2)
    out = step.eval_step(jax.device_put(state.params, step.shardings.params),
                         jax.device_put(data[0], sharding.batch_sharding(step.mesh)))
    assert float(out["tokens"]) == float(data[0]["loss_mask"].sum())
    assert abs(float(out["loss_sum"]) / float(out["tokens"]) - want_loss) <= 1e-5 * want_loss


@pytest.mark.parametrize("context", [2, 4])
def test_balance_pairs_head_with_tail_and_unbalance_inverts_it(context):
    t = 4 * context
    tokens = jnp.arange(2 * t).reshape(2, t)
    order = parallel.balance(tokens, context)
    assert sorted(np.asarray(order[1]).tolist()) == list(range(t, 2 * t))  # a permutation per row
    chunk = t // (2 * context)
    for rank, run in enumerate(np.asarray(order[0]).reshape(context, 2 * chunk)):
        tail = 2 * context - 1 - rank
        assert run.tolist() == list(range(rank * chunk, (rank + 1) * chunk)) + \
            list(range(tail * chunk, (tail + 1) * chunk))
    np.testing.assert_array_equal(parallel.unbalance(order, context), tokens)
    # so every rank does the same causal work: the sum of its positions
    work = np.asarray(order[0]).reshape(context, -1).sum(axis=1)
    assert len(set(work.tolist())) == 1


@pytest.mark.parametrize("key, value, message", [
    ("data.seq_len", 36, "data.seq_len=36 is not a multiple of 2 x mesh.context=8"),
    ("model.attention", "splash", "seq_len=32 is not a multiple of 128 x mesh.context=512"),
    ("model.attention", "cudnn", "'cudnn' does not run with mesh.context=4"),
    ("train.loss_chunk_size", 16, "loss_chunk_size=16 does not divide data.seq_len=32 / mesh.c"),
])
def test_context_settings_that_cannot_run_are_one_line_errors(key, value, message):
    config = micro_config()
    config.mesh.update({sharding.FSDP: 2, sharding.CONTEXT: 4})
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message) as error:
        validate(config, sharding.make_mesh(config.mesh))
    assert "\n" not in str(error.value)


def test_a_checkpoint_moves_between_context_sizes(tmp_path, reference):
    """Saved with context=2, restored onto context=1 (fsdp 8), saved again and restored onto
    context=4: the same values each time, laid out for the mesh it lands on."""
    state = reference[0]
    meshes = ({sharding.FSDP: 4, sharding.CONTEXT: 2}, {sharding.FSDP: 8},
              {sharding.DATA: 2, sharding.CONTEXT: 4})
    _, step = build(meshes[0])
    saved = jax.device_put(state, step.shardings)
    for n, mesh_config in enumerate(meshes[1:]):
        ckpt = checkpoint.Checkpointer(tmp_path / str(n))
        ckpt.save(0, saved, {"step": 0})
        ckpt.wait()
        _, step = build(mesh_config)
        saved = checkpoint.Checkpointer(tmp_path / str(n)).restore(0, step.abstract)
        assert saved.params["output"].sharding == step.shardings.params["output"]
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), saved, state)


def test_splash_with_context_compiles_for_a_tpu_slice():
    """attention=auto picks splash on TPU under context=2 (each device's 128 queries fill a
    block); the train step compiles for v5e:2x2 through libtpu, and the report puts the
    key/value gathers' least bytes beside the fsdp minimum."""
    config = micro_config(vocab_size=512, dim=256, n_heads=2, n_kv_heads=2, ffn_dim=512,
                          max_seq_len=256, dtype="bfloat16")
    config.data.update(seq_len=256, global_batch_size=4)
    config.mesh.update({sharding.FSDP: 2, sharding.CONTEXT: 2})
    plan = compile_lib.compile_plan(config, "v5e:2x2")
    assert plan["attention"] == "splash" and plan["mesh"][sharding.CONTEXT] == 2
    assert plan["fits"] is True
    # 2 layers x k and v x 2 rows per device x 256 tokens x 2 x 128 x 2 bytes, half of it
    # from the other context rank; remat "none": gathered once, reduce-scattered once
    half = 2 * 2 * 2 * 256 * 2 * 128 * 2 // 2
    assert plan["context_minimum_bytes_per_device"]["bytes"] == {"all-gather": half,
                                                                 "reduce-scatter": half}
    measured = plan["collective_bytes_per_device"]["total_bytes"]
    least = plan["fsdp_minimum_bytes_per_device"]["total_bytes"] + 2 * half
    # measured 2.30 x (jax 0.10.2, libtpu); above 1 since gradients are all-reduced
    assert plan["collective_ratio_to_minimum"] == round(measured / least, 3) and \
        1 <= measured / least < 3


def test_the_planner_tries_context_sizes():
    """--plan_context: the context size is a column of the table and an override of the best
    row; 8 sequences of 2 per batch shard on 4 chips as fsdp 2 x context 2: 2 microbatches."""
    rows, table = compile_lib.run_plan(micro_config(), "v5e:2x2", sizes=(2,), remats=("none",),
                                       contexts=(2,))
    assert [(r["context_size"], r["microbatches"], r["fits"]) for r in rows] == [(2, 2, True)]
    assert table.splitlines()[1].split()[0] == "context"
    assert table.splitlines()[-1] == ("best: --config.model.remat=none "
                                      "--config.train.microbatches=2 --config.mesh.context=2")
