"""How a step runs on the mesh: the layer stack's memory tactic (remat), gradient accumulation
over microbatches, the split over slices, the token order under context parallelism, and
placing parameters for inference. model.py says
what is computed; this module says how, so that a new way of running the same model (context or
pipeline parallelism) changes this file and not the model.
"""

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import sharding
from llama_jax.model import Block, Llama, ModelConfig, run_layers

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every activation is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    # keep the linear-layer outputs, recompute the cheap elementwise work (the paper's choice)
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # keep only each block's attention and MLP outputs; recompute the projections inside
    "minimal": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one step's batch is run, built once per mesh (make_plan); None of it holds memory."""
    mesh: Optional[jax.sharding.Mesh]  # None: one device, no constraints (evaluate, tests)
    microbatches: int = 1
    microbatch_sharding: Optional[NamedSharding] = None  # [N, B/N, T], each split like the batch
    param_shardings: Any = None  # the parameters' NamedShardings (the accumulator follows them)

    @property
    def slices(self):
        return 1 if self.mesh is None else sharding.size_of(dict(self.mesh.shape), sharding.DCN)

    @property
    def context(self):
        """The devices each sequence is split over (context parallelism); 1: none."""
        return 1 if self.mesh is None else sharding.size_of(dict(self.mesh.shape),
                                                            sharding.CONTEXT)


def make_plan(mesh, microbatches, param_shardings) -> Plan:
    # microbatches [N, B/N, T]: the leading axis is scanned, each one split like the batch
    return Plan(mesh, microbatches, NamedSharding(mesh, P(None, *sharding.batch_sharding(
        mesh).spec)), param_shardings)


# ------------------------------------------------------------------ context parallelism

def balance(x, context):
    """[B, T, ...] -> the same tokens reordered so that context rank r (which holds the r-th
    of `context` equal runs of T) gets chunks r and 2*context-1-r of 2*context equal chunks.

    Causal attention's work grows with the query's position: split in plain order, the last
    rank attends over the whole sequence while the first sees one chunk. Paired head with tail,
    every rank does the same work. A reshape, a flip and a stack (no gather); the loss is a sum
    over tokens and attention masks by positions and segment ids, so nothing else needs the
    original order."""
    if context == 1:
        return x
    b, t, rest = x.shape[0], x.shape[1], x.shape[2:]
    halves = x.reshape(b, 2, context, t // (2 * context), *rest)  # chunks [0, cp), [cp, 2cp)
    pairs = jnp.stack([halves[:, 0], jnp.flip(halves[:, 1], axis=1)], axis=2)  # [B, cp, 2, C]
    return pairs.reshape(x.shape)


def unbalance(x, context):
    """balance's inverse: a per-token result back in the batch's order."""
    if context == 1:
        return x
    b, t, rest = x.shape[0], x.shape[1], x.shape[2:]
    pairs = x.reshape(b, context, 2, t // (2 * context), *rest)
    return jnp.concatenate([pairs[:, :, 0], jnp.flip(pairs[:, :, 1], axis=1)], axis=1).reshape(
        x.shape)


def balanced(batch, plan: Plan):
    """The batch in balance's order, each entry laid out as the batch is (a permutation of
    each row's tokens between context ranks; nothing moves under context 1)."""
    if plan.context == 1:
        return batch
    layout = sharding.batch_sharding(plan.mesh)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(balance(x, plan.context),
                                                                   layout), batch)


# ------------------------------------------------------------------------------ the layers

def layer_stack(cfg: ModelConfig):
    """The runner Llama uses for its layers in training (Llama.layer_stack): cfg.remat's policy
    around each block; under remat "full" with scanned layers, remat_layers. None for remat
    "none": the plain stack."""
    if cfg.remat == "none":
        return None
    if cfg.scan_layers and cfg.remat == "full":
        return lambda module, x, positions, segment_ids: remat_layers(
            cfg, module.variables["params"]["layers"], x, positions, segment_ids)
    block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    return lambda module, x, positions, segment_ids: run_layers(
        cfg, block, x, positions, segment_ids)[0]


def _block(cfg, layer, x, positions, segment_ids):
    return Block(cfg).apply({"params": layer}, x, positions, segment_ids)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def remat_layers(cfg, layers, x, positions, segment_ids):
    """The scanned blocks under remat "full": the layers' stacked params [L, ...] applied in turn.

    Autodiff through nn.scan + nn.remat computes the same gradients, but stacks them in a new
    [L, ...] buffer beside the stacked weights the backward still reads. Here the backward
    writes layer i's gradient over layer i's weights, which it no longer needs (it goes from
    the last layer down): one stack instead of two (7B on v5p-8 at 4 sequences per chip: 13.52
    -> 8.23 GiB of temporaries). Only each layer's input is saved, as nothing_saveable does."""
    return _remat_layers_fwd(cfg, layers, x, positions, segment_ids)[0]  # XLA drops the inputs


def _remat_layers_fwd(cfg, layers, x, positions, segment_ids):
    def body(h, layer):
        return _block(cfg, layer, h, positions, segment_ids), h
    y, inputs = jax.lax.scan(body, x, layers)
    return y, (layers, inputs, positions, segment_ids)


def _remat_layers_bwd(cfg, res, dy):
    layers, inputs, positions, segment_ids = res

    def body(carry, i):
        dh, stack = carry
        layer = jax.tree.map(lambda s: s[i], stack)
        _, vjp = jax.vjp(lambda w, h: _block(cfg, w, h, positions, segment_ids), layer,
                         inputs[i])
        dlayer, dh = vjp(dh)
        stack = jax.tree.map(lambda s, g: jax.lax.dynamic_update_index_in_dim(s, g, i, 0),
                             stack, dlayer)
        return (dh, stack), None
    (dx, grads), _ = jax.lax.scan(body, (dy, layers), jnp.arange(cfg.n_layers), reverse=True)
    return grads, dx, None, None


remat_layers.defvjp(_remat_layers_fwd, _remat_layers_bwd)


# ------------------------------------------------------------------ microbatches and slices

def split_microbatches(batch, microbatches, microbatch_sharding):
    """[B, T] -> [N, B/N, T], row i of microbatch m being global row i*N + m.

    The batch arrives split over the batch axes in contiguous blocks of rows; taking every N-th
    row keeps each device's rows on that device (no communication) and spreads every
    microbatch over all batch-sharded devices, instead of giving microbatch m to a few of them.
    """
    def split(x):
        b = x.shape[0]
        x = jnp.swapaxes(x.reshape(b // microbatches, microbatches, *x.shape[1:]), 0, 1)
        return jax.lax.with_sharding_constraint(x, microbatch_sharding)
    return jax.tree.map(split, batch)


def by_slice(fn, slices):
    """fn(params, batch) computed for each slice's rows of the batch apart: a shard_map manual
    over the mesh's DCN axis only, so each slice runs the one-slice program (GSPMD partitions
    the rest as on one slice; the rules inside leave that axis out, sharding.per_slice), and
    the results come back stacked [slices, ...] for the caller to sum: nothing inside crosses
    the data-center network. Identity for one slice."""
    if slices == 1:
        return fn

    def one_slice(params, batch):
        return jax.tree.map(lambda x: x[None], sharding.per_slice(fn)(params, batch))
    return jax.shard_map(one_slice, in_specs=(P(), P(sharding.SLICES)),
                         out_specs=P(sharding.SLICES), axis_names={sharding.SLICES},
                         check_vma=False)


def gradients(loss_of, params, batch, plan: Plan):
    """(mean loss, token count, grads) of the global batch; loss_of(params, batch) gives the
    summed loss and the token count. One forward and backward for one microbatch on one
    slice; otherwise accumulated (accumulated_grads). Under context parallelism the tokens
    are load-balanced first (balanced)."""
    batch = balanced(batch, plan)
    if plan.microbatches == 1 and plan.slices == 1:  # one forward/backward, no scan
        def mean_loss(p, b):
            total, count = loss_of(p, b)
            return total / jnp.maximum(count, 1.0), count
        (loss, count), grads = jax.value_and_grad(mean_loss, has_aux=True)(params, batch)
        return loss, count, grads
    return accumulated_grads(loss_of, params, batch, plan)


def accumulated_grads(loss_of, params, batch, plan: Plan):
    """(mean loss, token count, grads) of the global batch, scanning over its microbatches.

    Each microbatch contributes its summed loss and summed gradient; dividing once by the
    total token count at the end weights every token equally, as the one-piece step does,
    however the masked tokens fall between microbatches. The float32 accumulator is
    constrained to the parameters' shardings, so it costs one sharded copy of the params.

    Over several slices each slice accumulates its own gradient (by_slice; the accumulator has
    a leading slices dim on the DCN axis, still one sharded copy of the params per device),
    summed across slices once after the last microbatch. Accumulated like the parameters
    instead (replicated over slices), every microbatch's gradient was all-reduced over DCN:
    16 microbatches, 16x the bytes.
    """
    slices, microbatches, param_shardings = plan.slices, plan.microbatches, plan.param_shardings
    grads_of = by_slice(lambda p, micro: jax.value_and_grad(loss_of, has_aux=True)(p, micro),
                        slices)
    lead = (slices,) if slices > 1 else ()
    if slices > 1:
        param_shardings = jax.tree.map(
            lambda s: NamedSharding(s.mesh, P(sharding.SLICES, *s.spec)), param_shardings)

    def constrain(grads):
        return jax.lax.with_sharding_constraint(grads, param_shardings)

    def body(carry, micro):
        acc, total, count = carry
        # the params plus a zero the compiler cannot fold (a float product of the loop index):
        # tied to the iteration, their cast to the compute dtype stays inside the loop. Hoisted
        # out of it (libtpu does, through an optimization_barrier too), the cast copy outlives
        # every microbatch's backward, which then cannot write the layers' gradients over it
        # (remat_layers): 7B on v5p-8, 128 microbatches, 22.91 -> 19.59 GiB temporaries
        micro, index = micro
        zero = index.astype(jnp.float32) * 0.0
        tied = jax.tree.map(lambda p: p + zero.astype(p.dtype), params)
        (micro_total, micro_count), grads = grads_of(tied, micro)
        acc = constrain(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads))
        return (acc, total + micro_total.sum(), count + micro_count.sum()), None

    zeros = constrain(jax.tree.map(lambda p: jnp.zeros(lead + p.shape, jnp.float32), params))
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (acc, total, count), _ = jax.lax.scan(
        body, init, (split_microbatches(batch, microbatches, plan.microbatch_sharding),
                     jnp.arange(microbatches)))
    acc = jax.tree.map(lambda a: a.sum(0), acc) if slices > 1 else acc  # the one sum over DCN
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda a, p: (a / denominator).astype(p.dtype), acc, params)
    return total / denominator, count, grads


def loss_sums(loss_of, params, batch, plan: Plan):
    """(summed loss, token count) of the global batch without gradients: one microbatch at a
    time with microbatches > 1, so evaluation fits wherever training does; over several slices
    each slice evaluates its rows (by_slice); tokens load-balanced as in training."""
    batch = balanced(batch, plan)
    loss_of = functools.partial(by_slice(loss_of, plan.slices), params)
    if plan.microbatches == 1:
        total, count = loss_of(batch)
        return total.sum(), count.sum()

    def body(carry, micro):
        micro_total, micro_count = loss_of(micro)
        return (carry[0] + micro_total.sum(), carry[1] + micro_count.sum()), None
    zero = jnp.zeros((), jnp.float32)
    (total, count), _ = jax.lax.scan(
        body, (zero, zero), split_microbatches(batch, plan.microbatches,
                                               plan.microbatch_sharding))
    return total, count


# ------------------------------------------------------------------------------- inference

def place(cfg: ModelConfig, params, mesh_config=None, rules=sharding.DEFAULT_RULES):
    """Puts the parameters on every device with the training sharding rules, so a model too big
    for one device spreads over all of them; the jitted steps follow (GSPMD)."""
    mesh = sharding.make_mesh(mesh_config or sharding.DEFAULT_MESH)
    boxed = jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0),
                                                   jnp.zeros((1, 8), jnp.int32))["params"])
    return jax.device_put(params, sharding.tree_shardings(boxed, mesh, rules))
