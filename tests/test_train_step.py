import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import micro_config, random_batch
from llama_jax import optim, sharding, train_step
from llama_jax.config import model_config
from llama_jax.model import Llama


def run_steps(config, mesh_config, rules, batches):
    size = int(np.prod(list(mesh_config.values())))
    mesh = sharding.make_mesh(mesh_config, jax.devices()[:size] if size > 0 else None)
    config.sharding_rules = rules
    step = train_step.build(config, mesh)
    state = step.init(jax.random.key(0))
    history = []
    for batch in batches:
        state, metrics = step.train_step(state, jax.device_put(batch,
                                                               sharding.batch_sharding(mesh)))
        history.append(jax.device_get(metrics))
    return state, history, step.train_step


def batches(config, n, same=False):
    keys = [jax.random.key(0)] * n if same else jax.random.split(jax.random.key(0), n)
    return [random_batch(k, config.data.global_batch_size, config.data.seq_len,
                         config.model.vocab_size) for k in keys]


@pytest.mark.parametrize("mesh_config, rules", [
    ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"),
    ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
    ({"slices": 2, "data": 1, "fsdp": 4, "tensor": 1}, "fsdp"),  # 2 fake slices of 4
])
def test_sharded_steps_match_the_single_device_run(mesh_config, rules):
    config = micro_config()
    data = batches(config, 3)
    _, want, _ = run_steps(config, {"data": 1, "fsdp": 1, "tensor": 1}, "fsdp", data)
    state, got, step = run_steps(config, mesh_config, rules, data)
    for w, g in zip(want, got):
        for key in ("loss", "grad_norm", "param_norm", "update_norm", "learning_rate"):
            assert abs(float(w[key]) - float(g[key])) <= 1e-5 * max(1.0, abs(float(w[key]))), key
    assert step._cache_size() == 1  # compiled once for all three steps
    assert state.params["layers"]["attention"]["wq"].sharding.spec != ()


def test_splash_attention_on_a_sharded_mesh_matches_the_reference():
    """TPU splash attention (run by the Pallas interpreter here) inside shard_map on a
    (data, fsdp, tensor) mesh gives the single-device XLA reference's losses and gradients,
    with packed documents and grouped kv heads."""
    config = micro_config(max_seq_len=128, n_layers=1)  # the interpreter is slow: keep it small
    config.data.update(seq_len=128, global_batch_size=4)  # the kernel's blocks: multiples of 128
    data = batches(config, 1)
    first = jnp.arange(128) < 50  # two documents per row: attention must not cross the boundary
    for batch in data:
        batch["segment_ids"] = jnp.where(first, 1, 2)[None].repeat(4, 0)
        batch["positions"] = jnp.where(first, jnp.arange(128), jnp.arange(128) - 50)[None].repeat(4, 0)
    config.model.attention = "xla"
    _, want, _ = run_steps(config, {"data": 1, "fsdp": 1, "tensor": 1}, "fsdp", data)
    config.model.attention = "splash"
    _, got, _ = run_steps(config, {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp", data)
    for w, g in zip(want, got):
        for key in ("loss", "grad_norm", "update_norm"):
            assert abs(float(w[key]) - float(g[key])) <= 1e-4 * abs(float(w[key])), key


def test_step_reports_metrics_and_learns_a_repeated_batch():
    config = micro_config()
    config.train.steps = 30
    _, history, _ = run_steps(config, {"fsdp": -1}, "fsdp", batches(config, 25, same=True))
    assert set(history[0]) == {"loss", "tokens", "grad_norm", "param_norm", "update_norm", "finite",
                               "learning_rate"}
    assert float(history[0]["learning_rate"]) == 0.0  # warmup starts at zero
    assert float(history[-1]["loss"]) < 0.5 * float(history[0]["loss"])


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_the_full_loss_and_gradient(tied):
    """The loss computes its output-projection gradient in the forward pass (custom VJP): its
    value and gradient, chunked or not, must equal plain autodiff through materialised logits.
    Tied, the embedding's gradient is its lookup's plus the projection's, transposed."""
    config = micro_config(tie_embeddings=tied)
    model = Llama(model_config(config))
    batch = random_batch(jax.random.key(3), 4, 32, 512)
    batch["loss_mask"] = batch["loss_mask"].at[:, :5].set(0.0)
    params = model.init(jax.random.key(0), batch["inputs"])["params"]
    params = jax.tree.map(lambda x: x.value, params, is_leaf=lambda x: hasattr(x, "value"))

    def loss(p, chunk):
        return train_step.loss_fn(p, batch, model, chunk)[0]

    def plain(p):  # the textbook formula, differentiated by JAX
        logits = model.apply({"params": p}, batch["inputs"])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None],
                                   -1)[..., 0]
        return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    full, chunked = loss(params, 0), loss(params, 8)
    np.testing.assert_allclose(chunked, full, rtol=1e-6)
    np.testing.assert_allclose(full, plain(params), rtol=1e-5)
    want = jax.grad(plain)(params)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                    atol=1e-5 * np.abs(b).max())
    for chunk in (0, 8):
        jax.tree.map(close, jax.grad(loss)(params, chunk), want)
    # and under jit with value_and_grad, as the train step calls it
    value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 8)
    np.testing.assert_allclose(value, full, rtol=1e-6)
    jax.tree.map(close, grads, want)


def test_schedule_warms_up_then_decays_to_ten_percent():
    config = micro_config()
    config.train.update(steps=100, warmup_steps=10, lr=1e-3)
    _, schedule = optim.make_optimizer(config.train)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(55)) == pytest.approx(0.55e-3, rel=1e-3)  # cosine midpoint
    assert float(schedule(100)) == pytest.approx(1e-4)


def test_weight_decay_skips_norm_scales_only():
    config = micro_config()
    model = Llama(model_config(config))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x.value, params, is_leaf=lambda x: hasattr(x, "value"))
    mask = optim.weight_decay_mask(params)
    assert mask["norm"]["scale"] is False and mask["layers"]["ffn_norm"]["scale"] is False
    assert mask["output"] and mask["tok_embeddings"] and mask["layers"]["attention"]["wq"]
    # a decoupled-decay step with zero gradient shrinks matrices and leaves scales alone
    config.train.update(warmup_steps=0, lr=1e-2)
    tx, _ = optim.make_optimizer(config.train)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert float(jnp.abs(updates["norm"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["output"]).max()) > 0.0


def test_casting_the_layers_once_changes_no_gradient(monkeypatch):
    """summed_loss casts the layers' matrices to the compute dtype outside the layer loop (for
    the TPU compiler's memory plan); the matmuls cast them anyway, so in bfloat16 the loss and
    every gradient are bit-identical to casting inside each layer."""
    config = micro_config(dtype="bfloat16")
    model = Llama(model_config(config))
    batch = random_batch(jax.random.key(3), 4, 32, 512)
    params = model.init(jax.random.key(0), batch["inputs"])["params"]
    params = jax.tree.map(lambda x: x.value, params, is_leaf=lambda x: hasattr(x, "value"))
    cast = train_step.layers_in_compute_dtype(params, jnp.bfloat16)
    assert cast["layers"]["feed_forward"]["w1"].dtype == jnp.bfloat16
    assert cast["layers"]["ffn_norm"]["scale"].dtype == jnp.float32
    assert cast["tok_embeddings"].dtype == cast["output"].dtype == jnp.float32
    def value_and_grads():  # a new function each call, so each traces with what is patched
        return jax.jit(jax.value_and_grad(
            lambda p: train_step.loss_fn(p, batch, model, 0)[0]))(params)
    value, grads = value_and_grads()
    monkeypatch.setattr(train_step, "layers_in_compute_dtype", lambda p, dtype: p)
    want_value, want = value_and_grads()
    assert float(value) == float(want_value)
    jax.tree.map(np.testing.assert_array_equal, grads, want)
