"""The LLaMA transformer in Flax linen, and ModelConfig with its parameter and FLOP counts.

Pre-RMSNorm blocks, causal attention with rotary embeddings (MHA or GQA), SwiGLU MLP, untied
output projection, no biases. Every parameter carries logical axis names; sharding.py maps them.
Axis letters: B batch, T sequence, D model dim, H heads, K kv heads, G heads per kv head,
E head dim, F ffn dim, V vocab, L layers.
"""

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from llama_jax import sharding

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every activation is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    # keep the linear-layer outputs, recompute the cheap elementwise work (the paper's choice)
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # keep only each block's attention and MLP outputs; recompute the projections inside
    "minimal": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# "auto" picks per backend: cudnn flash attention on GPU in 16-bit compute, splash (Pallas) on
# TPU, the plain XLA reference everywhere else.
ATTENTION = ("auto", "xla", "cudnn", "splash")


def resolve_attention(cfg, platform, seq_len=None):
    """cfg with attention="auto" replaced by the implementation for `platform` ("cpu", "gpu",
    "tpu"); seq_len None (generation: prompt lengths vary) never picks splash. Called once,
    where a config meets its mesh; a ModelConfig still on "auto" runs the portable xla path."""
    if cfg.attention != "auto":
        return cfg
    impl = "xla"
    if platform == "gpu" and cfg.dtype in ("bfloat16", "float16"):
        impl = "cudnn"  # cuDNN's fused kernel takes 16-bit inputs only
    elif platform == "tpu" and seq_len is not None and seq_len % 128 == 0:
        impl = "splash"  # its blocks are multiples of 128; otherwise auto falls back to xla
    return dataclasses.replace(cfg, attention=impl)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: Optional[int] = None  # None: same as n_heads (LLaMA-1 multi-head attention)
    ffn_dim: Optional[int] = None  # None: derived from multiple_of as in Meta's code
    multiple_of: int = 256
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "dots_saveable"
    scan_layers: bool = True
    attention: str = "auto"

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.ffn_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            object.__setattr__(
                self, "ffn_dim", self.multiple_of * math.ceil(hidden / self.multiple_of))
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                     "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads="
                             f"{self.n_heads}: pick n_heads that divides dim")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads="
                             f"{self.n_kv_heads}: pick n_kv_heads that divides n_heads")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for rotary embeddings")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r} is unknown: use one of "
                             f"{sorted(REMAT_POLICIES)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"model.attention={self.attention!r} is unknown: use one of "
                             f"{list(ATTENTION)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is unknown: use one of "
                                 f"{sorted(DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self) -> int:
        d, f, kv = self.dim, self.ffn_dim, self.n_kv_heads * self.head_dim
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # wq wo, wk wv, w1 w2 w3, 2 norms
        return 2 * self.vocab_size * d + self.n_layers * per_layer + d

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 per weight that multiplies (every parameter but the input
        embedding table, which is a lookup) plus causal attention scores (6*L*T*D). MFU and
        the scaling study use this count."""
        return 6 * (self.num_params() - self.vocab_size * self.dim) + \
            6 * self.n_layers * seq_len * self.dim


def _param(module, name, init, shape, axes, cfg):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                        DTYPES[cfg.param_dtype])


def _dense_init(fan_in):
    return nn.initializers.normal(stddev=fan_in ** -0.5)


def linear(x, w, in_dims=1):
    """x [..., *in] times w [*in, *out] -> [..., *out], as one 2-D matmul.

    Why 2-D: a projection written as an einsum over [B, T, ...] has a weight gradient that
    contracts two dims (B and T), and XLA:CPU canonicalises such a dot by physically transposing
    the activations first; with B and T merged into one row dim it needs no copy (cpu-bench: 21.4
    -> 18.8 CPU-s per step for the MLP alone). Other backends get the same matmuls.
    """
    k = math.prod(w.shape[:in_dims])
    out = x.reshape(-1, k) @ w.reshape(k, -1).astype(x.dtype)
    return out.reshape(*x.shape[:x.ndim - in_dims], *w.shape[in_dims:])


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", nn.initializers.ones, (self.cfg.dim,), ("norm",), self.cfg)
        x32 = x.astype(jnp.float32)  # the mean of squares in low precision loses too much
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x32 * scale.astype(jnp.float32)).astype(DTYPES[self.cfg.dtype])


def rope(x, positions, theta):
    """Rotary embedding in the rotate-half layout (Hugging Face's); x [B, T, N, E], positions [B, T].

    Meta's checkpoints rotate interleaved pairs instead; convert.py permutes their q/k rows once
    so that this single layout serves both.
    """
    e = x.shape[-1]
    freqs = 1.0 / theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e)  # [E/2]
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, E/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(segment_ids):
    """[B, T] segment ids -> [B, 1, 1, T, T] causal mask that never crosses a document."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None, None]


def reference_attention(q, k, v, mask):
    """Plain XLA attention: q [B, T, H, E], k/v [B, S, K, E], mask [B, 1, 1, T, S] -> [B, T, H, E].

    Materialises the [B, H, T, S] scores; the other implementations are tested against it.
    """
    b, t, h, e = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, e)  # GQA: G query heads share one kv head
    scores = jnp.einsum("bskge,btke->bkgst", q, k).astype(jnp.float32) * e ** -0.5
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [B, K, G, T, S]
    return jnp.einsum("bkgst,btke->bskge", probs, v).reshape(b, t, h, e)


def splash_attention(q, k, v, segment_ids):
    """TPU splash attention (Pallas): causal, block-sparse, documents kept apart by segment ids.

    The kernel sees one sequence with heads first, so it is vmapped over the batch; XLA cannot
    partition a Pallas call, so under a mesh each device runs it on its own batch rows and
    heads (shard_map). Off TPU the same kernel runs in the Pallas interpreter, which is how the
    CPU tests check it against the reference.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash, splash_attention_mask as masks)
    b, t, h, e = q.shape
    # the layout of q/k/v in the step being traced (sharding.py decides it from logical names)
    placed = sharding.activation_spec(("batch", "length", "heads", "head_dim"))
    device = jax.devices()[0] if placed is None else placed[0].devices.flat[0]  # the target
    block = min(512, t)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)

    def run(q, k, v, segment_ids):
        causal = masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(q.shape[2])])
        kernel = splash.make_splash_mha(causal, block_sizes=sizes, head_shards=1,
                                        q_seq_shards=1,
                                        interpret=device.platform != "tpu")
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, N, E] -> [B, N, T, E]
        out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=s1))(
            heads_first(q) * e ** -0.5, heads_first(k), heads_first(v),
            splash.SegmentIds(q=segment_ids, kv=segment_ids))
        return heads_first(out)

    if placed is None or placed[0].size == 1:
        return run(q, k, v, segment_ids)
    mesh, spec = placed
    return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, P(*spec[:2])),
                         out_specs=spec, check_vma=False)(q, k, v, segment_ids)


# cuDNN's packed layout is sized for a static number of documents per row. 16 covers every row
# whose documents average 128 tokens or more at seq 2048 (a trailing padding run counts as one);
# a batch with a fuller row takes the dense-bias path instead, which is correct, only slower.
# Each slot costs: cuDNN keeps float32 softmax statistics [B * M, H, T] for the backward pass
# (M times the unpacked size), and the kernel visits every slot, empty or not.
PACKED_MAX_SEGMENTS = 16


def _run_starts(segment_ids):
    """[B, T] -> [B, T] bool, True where a run of equal segment ids begins."""
    first = jnp.ones_like(segment_ids[:, :1], dtype=jnp.bool_)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def packed_segments(segment_ids, max_segments=PACKED_MAX_SEGMENTS):
    """segment_ids [B, T] -> (lengths [B, M], offsets [B, M + 1]), int32, for cuDNN's packed
    layout with M = max_segments.

    Each run of equal ids is one segment, a trailing padding run (id 0) included, so that every
    position is computed: cuDNN does not define the output outside every segment, and padding
    outputs flow on into the next layer. lengths[b, j] and offsets[b, j] are the j-th run's
    length and first position; slots past a row's last run hold -1, which is how jax's wrapper
    tells unused slots apart (it drops them and appends the end offset itself), so offsets[b, M]
    is always -1 for a row that fits. A row with more than M runs does not fit (packed_fits)."""
    t = segment_ids.shape[1]
    starts = _run_starts(segment_ids)
    runs = starts.sum(axis=1, keepdims=True)
    # where the first M + 1 runs begin; T stands in for the start after the last run
    first = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments + 1, fill_value=t)[0])(starts)
    slot = jnp.arange(max_segments + 1)
    offsets = jnp.where(slot < runs, first, -1)
    lengths = jnp.where(slot[:-1] < runs, first[:, 1:] - first[:, :-1], -1)
    return lengths.astype(jnp.int32), offsets.astype(jnp.int32)


def packed_fits(segment_ids, max_segments=PACKED_MAX_SEGMENTS):
    """Scalar bool: the packed layout gives exactly the segment-id mask for this batch, i.e. every
    row has at most M runs and no id comes back after another (runs == distinct ids)."""
    runs = _run_starts(segment_ids).sum(axis=1)
    ids = jnp.sort(segment_ids, axis=1)
    distinct = 1 + jnp.sum(ids[:, 1:] != ids[:, :-1], axis=1)
    return jnp.all((runs <= max_segments) & (runs == distinct))


def cudnn_attention(q, k, v, segment_ids):
    """cuDNN flash attention (GPU, 16-bit inputs), causal in the kernel. Packed documents go
    through cuDNN's packed layout (per-document lengths and offsets, Hopper or newer) when the
    batch fits PACKED_MAX_SEGMENTS, else as a dense [B, 1, T, T] bias, which costs ~8% of a 1B
    train step; lax.cond picks at run time, so both are compiled."""
    def dense(q, k, v, segment_ids):
        same = None if segment_ids is None else \
            (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True,
                                            implementation="cudnn")

    def packed(q, k, v, segment_ids):
        lengths, offsets = packed_segments(segment_ids)
        group = q.shape[2] // k.shape[2]
        if group > 1:  # jax (before PR 39521) scales kv offsets by the query's head count
            k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        # PADDING_CAUSAL: causal within each segment, each its own length (cuDNN wants a
        # padding-type mask with packed offsets; jax.nn uses it for lengths + causal too)
        return fused.dot_product_attention(
            q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
            kv_offsets=offsets, scale=q.shape[-1] ** -0.5,
            mask_type=fused.MaskType.PADDING_CAUSAL)

    # jax exposes the packed layout only through this private module
    from jax._src.cudnn import fused_attention_stablehlo as fused
    # before Hopper cuDNN has no packed layout, and lax.cond traces both branches
    if segment_ids is None or not fused.check_compute_capability("9.0"):
        return dense(q, k, v, segment_ids)
    return jax.lax.cond(packed_fits(segment_ids), packed, dense, q, k, v, segment_ids)


def causal_attention(q, k, v, segment_ids, impl):
    """Causal self-attention over packed documents (segment_ids [B, T]; None: one document per
    row) with the named implementation; every one matches reference_attention."""
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids)
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids)
    return blocked_attention(q, k, v, segment_ids)


def blocked_attention(q, k, v, segment_ids, block=128):
    """The reference, one block of queries at a time over only the keys at or before it: the
    masked upper triangle is never computed, which halves attention's time on CPU at T=512."""
    t = q.shape[1]
    outs = []
    for start in range(0, t, block):
        stop = min(start + block, t)
        causal = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]  # [Tq, S]
        same = segment_ids[:, start:stop, None] == segment_ids[:, None, :stop]
        mask = (causal[None] & same)[:, None, None]
        outs.append(reference_attention(q[:, start:stop], k[:, :stop], v[:, :stop], mask))
    return jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv=None, index=None, mask=None):
        """Causal self-attention over x's documents; with kv=(keys, values) [B, S, K, E] (a
        cache), this step's keys and values are written at slots [index, index + T) and the
        queries attend over all S slots under `mask`; then returns (out, new kv)."""
        cfg = self.cfg
        d, h, k, e = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        init = _dense_init(d)
        wq = _param(self, "wq", init, (d, h, e), ("embed", "heads", "head_dim"), cfg)
        wk = _param(self, "wk", init, (d, k, e), ("embed", "kv_heads", "head_dim"), cfg)
        wv = _param(self, "wv", init, (d, k, e), ("embed", "kv_heads", "head_dim"), cfg)
        wo = _param(self, "wo", _dense_init(h * e), (h, e, d), ("heads", "head_dim", "embed"), cfg)
        q, key, v = linear(x, wq), linear(x, wk), linear(x, wv)
        q = rope(q, positions, cfg.rope_theta)
        key = rope(key, positions, cfg.rope_theta)
        if kv is None:
            out = causal_attention(q, key, v, segment_ids, cfg.attention if cfg.attention != "auto" else "xla")
        else:  # decoding attends over cache slots: always the reference (it is one query row)
            start = (0, index, 0, 0)
            key = jax.lax.dynamic_update_slice(kv[0], key.astype(kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            out = reference_attention(q, key, v, mask)
        out = checkpoint_name(linear(out, wo, in_dims=2), "attn_out")
        return out if kv is None else (out, (key, v))


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        d, f = cfg.dim, cfg.ffn_dim
        w1 = _param(self, "w1", _dense_init(d), (d, f), ("embed", "mlp"), cfg)  # gate
        w3 = _param(self, "w3", _dense_init(d), (d, f), ("embed", "mlp"), cfg)  # up
        w2 = _param(self, "w2", _dense_init(f), (f, d), ("mlp", "embed"), cfg)  # down
        gate, up = linear(x, w1), linear(x, w3)
        out = linear(nn.silu(gate) * up, w2)
        return checkpoint_name(out, "mlp_out")


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv=None, index=None, mask=None):
        attn = Attention(self.cfg, name="attention")(
            RMSNorm(self.cfg, name="attention_norm")(x), positions, segment_ids, kv, index, mask)
        attn, kv = attn if kv is not None else (attn, None)
        x = x + attn
        x = x + MLP(self.cfg, name="feed_forward")(RMSNorm(self.cfg, name="ffn_norm")(x))
        return x, kv  # (carry, per-layer output) so the same block runs under nn.scan


def init_cache(cfg: ModelConfig, batch: int, length: int):
    """An empty KV cache of `length` slots: keys/values [L, B, S, K, E], the segment id of each
    slot [B, S] (0: empty or padding, never attended) and the next slot to write."""
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, DTYPES[cfg.dtype]), "v": jnp.zeros(shape, DTYPES[cfg.dtype]),
            "segment_ids": jnp.zeros((batch, length), jnp.int32),
            "index": jnp.zeros((), jnp.int32)}


def cache_mask(cache, segment_ids):
    """Queries at slots [index, index + T) see every earlier non-padding slot: [B, 1, 1, T, S]
    mask, and the slot segment ids with this step's written in."""
    t, s = segment_ids.shape[1], cache["segment_ids"].shape[1]
    slots = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32),
                                         (0, cache["index"]))
    causal = jnp.arange(s)[None, :] <= (cache["index"] + jnp.arange(t))[:, None]  # [T, S]
    return (causal[None] & (slots[:, None, :] > 0))[:, None, None], slots


class Llama(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, return_hidden=False,
                 cache=None):
        """tokens [B, T] -> logits [B, T, V] (float32), or the final normed hidden [B, T, D].

        segment_ids [B, T] keep packed documents apart (0 marks padding); positions restart
        at 0 in each document. Both default to a single unpadded document per row.
        With a cache (init_cache), the T tokens fill its next T slots and attend to every
        earlier slot; returns (logits or hidden, updated cache). Generation uses this for
        prefill and for each decode step, so the prefix is never recomputed.
        """
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        if cache is None:
            extra = ()
        else:
            if segment_ids is None:
                segment_ids = jnp.ones((b, t), jnp.int32)
            mask, slots = cache_mask(cache, segment_ids)
            extra = ((cache["k"], cache["v"]), cache["index"], mask)
        embed = _param(self, "tok_embeddings", nn.initializers.normal(0.02),
                       (cfg.vocab_size, cfg.dim), ("vocab", "embed"), cfg)
        x = jnp.take(embed, tokens, axis=0).astype(DTYPES[cfg.dtype])  # [B, T, D]

        policy = REMAT_POLICIES[cfg.remat]
        block = Block if cfg.remat == "none" else nn.remat(
            Block, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            # One compiled layer body looped L times: compile time does not grow with depth.
            # The cache's [L, ...] keys and values are scanned over with the layers.
            in_axes = (nn.broadcast,) * 2 + ((0, nn.broadcast, nn.broadcast) if extra else ())
            layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=in_axes, length=cfg.n_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            x, kv = layers(cfg, name="layers")(x, positions, segment_ids, *extra)
        else:
            kvs = []
            for i in range(cfg.n_layers):
                layer_extra = (jax.tree.map(lambda c: c[i], extra[0]),) + extra[1:] if extra else ()
                x, layer_kv = block(cfg, name=f"layers_{i}")(x, positions, segment_ids,
                                                             *layer_extra)
                kvs.append(layer_kv)
            kv = jax.tree.map(lambda *a: jnp.stack(a), *kvs) if extra else None

        x = RMSNorm(cfg, name="norm")(x)
        out = _param(self, "output", _dense_init(cfg.dim), (cfg.dim, cfg.vocab_size),
                     ("embed", "vocab"), cfg)
        if return_hidden:  # the loss projects in chunks so [B, T, V] never exists at once
            result = x
        else:
            result = linear(x, out).astype(jnp.float32)
        if cache is None:
            return result
        return result, {"k": kv[0], "v": kv[1], "segment_ids": slots,
                        "index": cache["index"] + t}
