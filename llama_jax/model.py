"""The LLaMA transformer in Flax linen, and ModelConfig with its parameter and FLOP counts.

Pre-RMSNorm blocks, causal attention with rotary embeddings (MHA or GQA; plain, linear or
Llama 3 frequency scaling), SwiGLU MLP, an output projection of its own or tied to the input
embedding (Llama 3.2), no biases. Every parameter carries logical axis names; sharding.py maps them.
Axis letters: B batch, T sequence, S cache slot, D model dim, H heads, K kv heads, E head dim,
F ffn dim, V vocab, L layers. The attention implementations live in attention.py.
"""

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from llama_jax.attention import causal_attention, reference_attention
from llama_jax import sharding
from llama_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# logical axes of the activations that decide the layout (sharding.py maps them)
HIDDEN = ("batch", "length", "activation_embed")  # [B, T, D]
QUERY = ("batch", "length", "heads", "head_dim")  # [B, T, H, E]
KEY_VALUE = ("batch", "length", "kv_heads", "head_dim")  # [B, T, K, E]
MLP_HIDDEN = ("batch", "length", "mlp")  # [B, T, F]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: Optional[int] = None  # None: same as n_heads (LLaMA-1 multi-head attention)
    head_dim: Optional[int] = None  # None: dim // n_heads (every Llama release so far)
    ffn_dim: Optional[int] = None  # None: derived from multiple_of as in Meta's code
    multiple_of: int = 256
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # RoPE frequency scaling for contexts beyond the one pretrained (Hugging Face's rope_type):
    # "none"; "linear" (every frequency / factor); "llama3" (Llama 3.1/3.2: long wavelengths /
    # factor, short ones kept, a smooth blend between, set by the fields below)
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    tie_embeddings: bool = False  # logits use tok_embeddings.T; there is no "output" parameter
    max_seq_len: int = 2048
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "dots_saveable"  # a policy in parallel.REMAT_POLICIES
    scan_layers: bool = True
    attention: str = "auto"

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.n_heads > 0 and self.dim % self.n_heads:
                raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads="
                                 f"{self.n_heads}: pick n_heads that divides dim, or set "
                                 "model.head_dim")
            object.__setattr__(self, "head_dim", self.dim // max(self.n_heads, 1))
        if self.ffn_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            object.__setattr__(
                self, "ffn_dim", self.multiple_of * math.ceil(hidden / self.multiple_of))
        # each field's own range is ranges.py's (its messages); checked here too, for a library
        # user who builds a ModelConfig directly. What follows relates fields to each other.
        from llama_jax import ranges  # ranges imports this module
        ranges.check_model(self)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads="
                             f"{self.n_kv_heads}: pick n_kv_heads that divides n_heads")
        if self.rope_scaling == "llama3" and not (
                self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise ValueError(f"model.rope_low_freq_factor={self.rope_low_freq_factor} must be "
                             f"below rope_high_freq_factor={self.rope_high_freq_factor}")

    def num_params(self) -> int:
        d, f = self.dim, self.ffn_dim
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        per_layer = 2 * d * q + 2 * d * kv + 3 * d * f + 2 * d  # wq wo, wk wv, w1 w2 w3, 2 norms
        tables = 1 if self.tie_embeddings else 2  # input embedding [+ output projection]
        return tables * self.vocab_size * d + self.n_layers * per_layer + d

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 per weight that multiplies plus causal attention scores
        (6*L*T*H*E, H*E = D in every Llama). The input embedding is a lookup, not a matmul: an
        untied table is left out, a tied one counts once (as the output projection). MFU and the
        scaling study use this count."""
        lookup = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return 6 * (self.num_params() - lookup) + \
            6 * self.n_layers * seq_len * self.n_heads * self.head_dim


def _param(module, name, init, shape, axes, cfg):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                        DTYPES[cfg.param_dtype])


def _dense_init(fan_in):
    return nn.initializers.normal(stddev=fan_in ** -0.5)


def linear(x, w, in_dims=1):
    """x [..., *in] times w [*in, *out] -> [..., *out], with x's leading dims merged into one
    row dim.

    Why one row dim: a projection written as an einsum over [B, T, ...] has a weight gradient
    that contracts two dims (B and T), and XLA:CPU canonicalises such a dot by physically
    transposing the activations first; with B and T merged it needs no copy (cpu-bench: 21.4
    -> 18.8 CPU-s per step for the MLP alone). Why w keeps its shape on TPU and GPU: a reshaped
    weight is another array to the partitioner, and under remat the backward gathered an
    attention weight twice, as [D, H, E] for the recomputed forward and again as the [D, H*E]
    matrix (7B on v5p-8: 3.2 GB more collective bytes per step and chip). XLA:CPU runs the
    3-D contraction ~7% slower (cpu-bench), so there the weight is flattened to one matrix.
    """
    rows = x.reshape(-1, *x.shape[x.ndim - in_dims:])
    if sharding.traced_platform() == "cpu":
        k = math.prod(w.shape[:in_dims])
        out = rows.reshape(-1, k) @ w.reshape(k, -1).astype(x.dtype)
    else:
        out = jnp.tensordot(rows, w.astype(x.dtype), axes=in_dims)
    return out.reshape(*x.shape[:x.ndim - in_dims], *w.shape[in_dims:])


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", nn.initializers.ones, (self.cfg.dim,), ("norm",), self.cfg)
        x32 = x.astype(jnp.float32)  # the mean of squares in low precision loses too much
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x32 * scale.astype(jnp.float32)).astype(DTYPES[self.cfg.dtype])


ROPE_SCALING = ("none", "linear", "llama3")


def rope_frequencies(cfg: ModelConfig):
    """The E/2 rotary frequencies [E/2], float32, after cfg.rope_scaling.

    llama3 (Meta's Llama 3.1 code, HF rope_type "llama3"): with wavelength w = 2 pi / f and the
    pretrained context C, w < C / high_freq_factor keeps f (local order stays sharp),
    w > C / low_freq_factor takes f / factor (long range stretches to the new context), and in
    between f blends linearly in C / w from one to the other."""
    e = cfg.head_dim
    freqs = 1.0 / cfg.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e)
    factor = cfg.rope_scaling_factor
    if cfg.rope_scaling == "linear":
        return freqs / factor
    if cfg.rope_scaling == "llama3":
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        context = cfg.rope_original_max_seq_len
        wavelength = 2 * math.pi / freqs
        smooth = jnp.clip((context / wavelength - low) / (high - low), 0.0, 1.0)
        return (1 - smooth) * freqs / factor + smooth * freqs
    return freqs


def rope(x, positions, freqs):
    """Rotary embedding, rotate-half layout (Hugging Face's): x [B, T, H or K, E], positions [B, T],
    freqs [E/2] (rope_frequencies). Meta's checkpoints rotate interleaved pairs; convert.py
    permutes their q/k rows once instead."""
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, E/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


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
        freqs = rope_frequencies(cfg)
        q = constrain(rope(linear(x, wq), positions, freqs), QUERY)
        key = constrain(rope(linear(x, wk), positions, freqs), KEY_VALUE)
        v = constrain(linear(x, wv), KEY_VALUE)
        if kv is None:
            out = causal_attention(q, key, v, segment_ids, cfg.attention, positions)
        else:  # decoding attends over cache slots: always the reference (it is one query row)
            start = (0, index, 0, 0)
            key = jax.lax.dynamic_update_slice(kv[0], key.astype(kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            out = reference_attention(q, key, v, mask)
        out = constrain(out, QUERY)
        out = checkpoint_name(constrain(linear(out, wo, in_dims=2), HIDDEN), "attn_out")
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
        gate, up = constrain(linear(x, w1), MLP_HIDDEN), constrain(linear(x, w3), MLP_HIDDEN)
        return checkpoint_name(constrain(linear(nn.silu(gate) * up, w2), HIDDEN), "mlp_out")


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv=None, index=None, mask=None):
        attn = Attention(self.cfg, name="attention")(
            RMSNorm(self.cfg, name="attention_norm")(x), positions, segment_ids, kv, index, mask)
        attn, kv = attn if kv is not None else (attn, None)
        x = constrain(x + attn, HIDDEN)
        x = x + MLP(self.cfg, name="feed_forward")(RMSNorm(self.cfg, name="ffn_norm")(x))
        return constrain(x, HIDDEN), kv  # (carry, per-layer output) so the same block runs under nn.scan


def run_layers(cfg, block, x, positions, segment_ids, *extra):
    """(x, per-layer cache) after the L blocks, run as Llama's submodules: one compiled body
    looped L times under cfg.scan_layers (compile time does not grow with depth), else a Python
    loop. `block` is Block, or Block inside a remat policy (parallel.layer_stack). extra: a KV
    cache's ([L, ...] keys and values, scanned over with the layers), write index and mask."""
    if cfg.scan_layers:
        in_axes = (nn.broadcast,) * 2 + ((0, nn.broadcast, nn.broadcast) if extra else ())
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=in_axes, length=cfg.n_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        return layers(cfg, name="layers")(x, positions, segment_ids, *extra)
    kvs = []
    for i in range(cfg.n_layers):
        layer = (jax.tree.map(lambda c: c[i], extra[0]),) + extra[1:] if extra else ()
        x, layer_kv = block(cfg, name=f"layers_{i}")(x, positions, segment_ids, *layer)
        kvs.append(layer_kv)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *kvs) if extra else None


def output_matrix(params, cfg: ModelConfig):
    """The output projection [D, V]: its own parameter, or the input embedding's transpose."""
    return params["tok_embeddings"].T if cfg.tie_embeddings else params["output"]


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
    # how training runs the layers (parallel.layer_stack: a remat policy, remat_layers);
    # None, and always at init and with a cache: run_layers with the plain Block
    layer_stack: Optional[Callable] = None

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, return_hidden=False,
                 cache=None):
        """tokens [B, T] -> logits [B, T, V] (float32), or the final normed hidden [B, T, D].

        segment_ids [B, T] keep packed documents apart (0 marks padding); positions restart
        at 0 in each document; both default to one unpadded document per row. With a cache
        (init_cache) the T tokens fill its next T slots and attend to every earlier slot, and
        the updated cache is returned too: generation's prefill and decode steps never
        recompute the prefix."""
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        extra = ()
        if cache is not None:
            if segment_ids is None:
                segment_ids = jnp.ones((b, t), jnp.int32)
            mask, slots = cache_mask(cache, segment_ids)
            extra = ((cache["k"], cache["v"]), cache["index"], mask)
        embed = _param(self, "tok_embeddings", nn.initializers.normal(0.02),
                       (cfg.vocab_size, cfg.dim), ("vocab", "embed"), cfg)
        # the table is gathered whole (in the compute dtype) for the lookup, as every weight is
        # before its matmul. Looked up in its fsdp split, the lookup's gradient had to go from
        # the batch's layout to the table's, which GSPMD does by gathering the whole batch's
        # [B, T, D] on every device once the batch is also split over data or slices (and
        # XLA:CPU's partitioner aborts on it inside parallel.by_slice with a tensor axis)
        table = constrain(embed.astype(DTYPES[cfg.dtype]), ("vocab", None))
        x = constrain(jnp.take(table, tokens, axis=0), HIDDEN)

        if self.layer_stack is not None and not extra and not self.is_initializing():
            x = self.layer_stack(self, x, positions, segment_ids)
        else:
            x, kv = run_layers(cfg, Block, x, positions, segment_ids, *extra)

        x = constrain(RMSNorm(cfg, name="norm")(x), HIDDEN)  # [B, T, D], into the loss
        out = embed.T if cfg.tie_embeddings else _param(
            self, "output", _dense_init(cfg.dim), (cfg.dim, cfg.vocab_size), ("embed", "vocab"),
            cfg)
        # return_hidden: the loss projects in chunks, so [B, T, V] never exists at once
        result = x if return_hidden else linear(x, out).astype(jnp.float32)
        if cache is None:
            return result
        return result, {"k": kv[0], "v": kv[1], "segment_ids": slots, "index": cache["index"] + t}
