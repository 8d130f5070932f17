"""TrainState, the loss, and the sharded, jitted init / train_step / eval_step.

Every function here is pure. State is created straight into sharded memory: the abstract state
(jax.eval_shape) gives logical axes, sharding.py turns them into NamedShardings, and the init is
jitted with those as out_shardings, so no host ever holds a full copy of the parameters.
"""

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llama_jax import optim, parallel, sharding, xla_flags
from llama_jax.config import validate
from llama_jax.model import DTYPES, Llama, ModelConfig, output_matrix
from llama_jax.sharding import constrain


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def cross_entropy(hidden, w_out, targets, loss_mask, chunk_size=0):
    """(summed next-token loss, token count) from hidden [B, T, D] and w_out [D, V], masked.

    The output projection's gradient is computed in the forward pass (see _nll_and_grads), so
    the backward never recomputes or stores the [B, T, V] logits. With chunk_size, logits are
    built chunk_size positions at a time, so only [B, chunk, V] float32 logits exist at once.
    """
    chunk = chunk_size or hidden.shape[1]
    return _nll_sum(hidden, w_out, targets, loss_mask, chunk), jnp.sum(loss_mask)


# the loss's projection-gradient buffer [S, G, D, V]: one whole [D, V] per device
DW_CELLS = ("batch", "length", None, "vocab")


def _nll_and_grads(hidden, w_out, targets, loss_mask, chunk, grads):
    """Summed masked NLL, and with grads=True also d(sum)/d(hidden) and d(sum)/d(w_out).

    The loss is a scalar, so its gradient is these two arrays times the incoming cotangent:
    computing them while the chunk's logits exist costs the same two matmuls autodiff would, and
    saves the third (the logits again) that a rematerialised backward needs.

    The projection moves once per call, however many chunks: it is cast to the compute dtype
    and gathered whole (its vocabulary split kept) before the chunk loop, and each device sums
    its own rows' gradient into a buffer of its own, [S, G, D, V] for the S batch shards and G
    context ranks, which is reduce-scattered once after the loop. Left to the partitioner, the loop gathered the
    projection and reduce-scattered a float32 gradient once per chunk (Llama-2-7B on v5p-8 at
    chunk 512: 4 of each per step, 1.97 GB more per chip). The buffer is whole [D, V] on
    every device, so it is kept in the compute dtype, as the layers' gradients are (each
    chunk's product is summed in float32, then added): in float32 it cost 0.44 GB more per
    chip on 16 chips (docs/distributed.md, "Issue 25 rows").
    """
    b, t, d = hidden.shape
    # with the sequence split over context, each step takes `chunk` positions from every
    # rank's own run of T, so no step's hidden sits on a few ranks (the scan axis is unsplit)
    groups = sharding.parts("length")
    chunk = min(chunk, t // groups)
    n, width = t // (groups * chunk), groups * chunk
    s = sharding.parts("batch")
    w = constrain(w_out.astype(hidden.dtype), (None, "vocab"))  # [D, V], gathered over D

    def step(carry, xs):
        total, dw = carry
        h, y, m = (x.reshape(b * width, *x.shape[2:]) for x in xs)  # [B*C, D], [B*C], [B*C]
        logits = (h @ w).astype(jnp.float32)  # 2-D matmuls, as model.linear explains
        lse = jax.nn.logsumexp(logits, axis=-1)
        # the target's logit by a one-hot product, not a gather: with the vocabulary split over
        # `tensor` a gather along it made the SPMD partitioner abort inside parallel.by_slice
        onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.float32)
        nll = lse - jnp.sum(logits * onehot, axis=-1)
        total = total + jnp.sum(nll * m)
        if not grads:
            return (total, dw), None
        # d nll / d logits = softmax - onehot(target), zero where the position is masked
        dlogits = (jnp.exp(logits - lse[:, None]) - onehot) * m[:, None]
        dlogits = dlogits.astype(h.dtype)
        dh = (dlogits @ w.T).reshape(b, width, d)
        # rows are (row, context rank, position), so each device's rows are one [S, G] cell:
        # S batch shards, G context ranks
        cells = lambda x: x.reshape(s, b // s, groups, chunk, x.shape[-1])
        dw = dw + jnp.einsum("sbgcd,sbgcv->sgdv", cells(h), cells(dlogits),
                             preferred_element_type=jnp.float32).astype(dw.dtype)
        return (total, constrain(dw, DW_CELLS)), dh

    def split(x):  # [B, T, ...] -> [n, B, groups * C, ...]
        x = jnp.moveaxis(x.reshape(b, groups, n, chunk, *x.shape[2:]), 2, 0)
        return x.reshape(n, b, width, *x.shape[4:])

    dw0 = constrain(jnp.zeros((s, groups, *w_out.shape), hidden.dtype),
                    DW_CELLS) if grads else None
    (total, dw), dh = jax.lax.scan(step, (jnp.zeros((), jnp.float32), dw0),
                                   (split(hidden), split(targets), split(loss_mask)))
    if not grads:
        return total
    # the one sum over the batch shards and context ranks, in the compute dtype (lax.reduce:
    # jnp.sum computes a bfloat16 sum in float32), landing in the projection's own split
    dw = jax.lax.reduce(dw, jnp.zeros((), hidden.dtype), jax.lax.add, (0, 1))
    return (total, jnp.moveaxis(dh.reshape(n, b, groups, chunk, d), 0, 2).reshape(b, t, d),
            constrain(dw, ("embed", "vocab")))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _nll_sum(hidden, w_out, targets, loss_mask, chunk):
    return _nll_and_grads(hidden, w_out, targets, loss_mask, chunk, grads=False)


def _nll_sum_fwd(hidden, w_out, targets, loss_mask, chunk):
    total, dh, dw = _nll_and_grads(hidden, w_out, targets, loss_mask, chunk, grads=True)
    return total, (dh, dw.astype(w_out.dtype))  # dw: its shard, summed in the compute dtype


def _nll_sum_bwd(chunk, res, g):
    dh, dw = res
    return g.astype(dh.dtype) * dh, g.astype(dw.dtype) * dw, None, None  # targets, mask: data


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)


def layers_in_compute_dtype(params, dtype):
    """params with the layers' matrices cast to the compute dtype, once, outside the layer loop.

    Their matmuls cast them anyway; cast inside the scanned body, the TPU compiler hoisted the
    cast of the whole stack out of the loop and kept the backward's per-layer gradients as a
    float32 stack beside it (7B on v5p-8: 3.1 GB more temporaries). Cast here, the backward
    stacks the gradients in the compute dtype, the values each layer's matmul produced, and the
    cast back to float32 fuses into the optimizer. Norm scales, the embedding table (its
    gradient sums many tokens' rows) and the output projection keep their dtype."""
    def cast(path, x):
        in_layers = getattr(path[0], "key", "").startswith("layers")
        return x.astype(dtype) if in_layers and getattr(path[-1], "key", "") != "scale" else x
    return jax.tree_util.tree_map_with_path(cast, params)


def summed_loss(params, batch, model, chunk_size):
    """(summed next-token loss, token count) of a batch: the forward pass both steps share."""
    params = layers_in_compute_dtype(params, DTYPES[model.cfg.dtype])
    hidden = model.apply({"params": params}, batch["inputs"], batch["positions"],
                         batch.get("segment_ids"), return_hidden=True)
    return cross_entropy(hidden, output_matrix(params, model.cfg), batch["targets"],
                         batch["loss_mask"], chunk_size)


def loss_fn(params, batch, model, chunk_size):
    """(mean loss, token count) of a batch."""
    total, count = summed_loss(params, batch, model, chunk_size)
    return total / jnp.maximum(count, 1.0), count


def train_step(state, batch, *, model, tx, schedule, chunk_size, plan):
    """One optimizer step. A non-finite loss or gradient drops the update (params and optimizer
    state stay as they were) and reports finite=0; train.py decides whether to stop.

    The gradient comes from parallel.gradients: one forward/backward, or accumulated over
    plan.microbatches (activations held for one microbatch only; over several slices always,
    so that slices exchange gradients once per step and nothing else)."""
    loss, count, grads = parallel.gradients(
        lambda p, b: summed_loss(p, b, model, chunk_size), state.params, batch, plan)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
    metrics = {
        "loss": loss, "tokens": count, "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates),
        "learning_rate": schedule(state.step), "finite": finite.astype(jnp.float32),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model, chunk_size, plan=parallel.Plan(mesh=None)):
    """Summed loss and token count, so batches average exactly (parallel.loss_sums: one
    microbatch at a time, and each slice its own rows, as in training)."""
    total, count = parallel.loss_sums(lambda p, b: summed_loss(p, b, model, chunk_size),
                                      params, batch, plan)
    return {"loss_sum": total, "tokens": count}


def _boxed_init(rng, model, tx, seq_len):
    """Init with nn.Partitioned boxes left on, so the optimizer state inherits logical axes."""
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(model, tx, mesh, rules_name, seq_len):
    """(abstract state, NamedSharding tree) without allocating anything."""
    boxed = jax.eval_shape(
        functools.partial(_boxed_init, model=model, tx=tx, seq_len=seq_len), jax.random.key(0))
    shardings = sharding.tree_shardings(boxed, mesh, rules_name)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.unbox(boxed), shardings)
    return abstract, shardings


BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32,
                "segment_ids": jnp.int32, "loss_mask": jnp.float32}


@dataclasses.dataclass(frozen=True)
class Step:
    """What every user of the train step needs (train, bench, compile, tests), built once from a
    config and a mesh by build(). Nothing here holds device memory until init() is called."""
    config: Any  # the ml_collections config it was built from
    cfg: ModelConfig  # attention resolved for the mesh's platform
    model: Llama
    mesh: jax.sharding.Mesh
    plan: parallel.Plan  # how the batch runs on the mesh: microbatches, slices
    tx: optax.GradientTransformation
    schedule: Any
    abstract: TrainState  # ShapeDtypeStructs that carry their shardings
    shardings: TrainState  # NamedSharding of every state leaf
    train_step: Any  # jitted (state, batch) -> (state, metrics), the state donated
    eval_step: Any  # jitted (params, batch) -> {"loss_sum", "tokens"}
    compiler_options: dict  # the compiler flags both steps compile with (xla_flags.py)

    def init(self, rng):
        """A fresh TrainState, each array created directly with its sharding."""
        seq_len = self.config.data.seq_len
        init = jax.jit(lambda r: nn.unbox(_boxed_init(r, self.model, self.tx, seq_len)),
                       out_shardings=self.shardings)
        return init(rng)

    def abstract_batch(self):
        """The global batch as ShapeDtypeStructs, for lowering without data."""
        shape = (self.config.data.global_batch_size, self.config.data.seq_len)
        batch_sharding = sharding.batch_sharding(self.mesh)
        return {k: jax.ShapeDtypeStruct(shape, d, sharding=batch_sharding)
                for k, d in BATCH_DTYPES.items()}


def build(config, mesh) -> Step:
    """validate -> Llama -> optimizer -> abstract state and shardings -> plan -> jitted steps."""
    cfg = validate(config, mesh)
    model = Llama(cfg, layer_stack=parallel.layer_stack(cfg))
    tx, schedule = optim.make_optimizer(config.train)
    abstract, shardings = state_shardings(model, tx, mesh, config.sharding_rules,
                                          config.data.seq_len)
    chunk_size = config.train.loss_chunk_size
    rules = config.sharding_rules
    plan = parallel.make_plan(mesh, config.train.microbatches, shardings.params)
    train = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                              chunk_size=chunk_size, plan=plan)
    evaluate = functools.partial(eval_step, model=model, chunk_size=chunk_size, plan=plan)
    batch_sharding = sharding.batch_sharding(mesh)  # every batch entry is [B, T] split alike
    # the chips' compiler flags, here so that training and the AOT plan compile alike
    options = xla_flags.compiler_options(config.xla, mesh.devices.flat[0])
    return Step(
        config=config, cfg=cfg, model=model, mesh=mesh, plan=plan, tx=tx, schedule=schedule,
        abstract=abstract, shardings=shardings, compiler_options=options,
        train_step=jax.jit(sharding.traced_under(mesh, rules, train),
                           in_shardings=(shardings, batch_sharding),
                           out_shardings=(shardings, sharding.replicated(mesh)),
                           donate_argnums=0, compiler_options=options),
        eval_step=jax.jit(sharding.traced_under(mesh, rules, evaluate),
                          in_shardings=(shardings.params, batch_sharding),
                          out_shardings=sharding.replicated(mesh), compiler_options=options))
