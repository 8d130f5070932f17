"""Causal self-attention over packed documents: the XLA reference (and its blocked form), TPU
splash (Pallas), cuDNN flash, and the per-backend choice behind attention="auto". Axis letters:
B batch, T query position, S key position, H heads, K kv heads, G heads per kv head, E head dim.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from llama_jax import sharding

# "auto" picks per backend: cudnn flash attention on GPU in 16-bit compute, splash (Pallas) on
# TPU, the plain XLA reference everywhere else.
ATTENTION = ("auto", "xla", "cudnn", "splash")


def resolve_attention(cfg, platform, seq_len=None, context=1):
    """cfg with attention="auto" replaced by the implementation for `platform` ("cpu", "gpu",
    "tpu"); seq_len None (generation: prompt lengths vary) never picks splash; with the
    sequence split over context > 1 devices, never cudnn. Called once, where a config
    meets its mesh; a ModelConfig still on "auto" runs the portable xla path."""
    if cfg.attention != "auto":
        return cfg
    impl = "xla"
    if platform == "gpu" and cfg.dtype in ("bfloat16", "float16") and context == 1:
        impl = "cudnn"  # cuDNN's fused kernel takes 16-bit inputs only
    elif platform == "tpu" and seq_len is not None and seq_len % (128 * context) == 0:
        impl = "splash"  # its blocks are multiples of 128; otherwise auto falls back to xla
    return dataclasses.replace(cfg, attention=impl)


def attention_mask(segment_ids):
    """[B, T] segment ids -> [B, 1, 1, T, S] (S = T) causal mask that never crosses a document."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None, None]


def document_mask(q_positions, q_segments, k_positions, k_segments):
    """[B, T] and [B, S] positions and segment ids -> [B, 1, 1, T, S]: a query sees a key of its
    own document at or before its position. Built from the values, not the array order, so it
    holds for tokens in any order (context parallelism's load-balanced one)."""
    same = q_segments[:, :, None] == k_segments[:, None, :]
    causal = k_positions[:, None, :] <= q_positions[:, :, None]
    return (same & causal)[:, None, None]


def context_attention(q, k, v, positions, segment_ids):
    """The reference with the sequence split over context: each device keeps its queries (in
    load-balanced order, parallel.balance) and gathers every key and value, whose causal order
    comes from the gathered positions (document_mask)."""
    # the length dim unsplit: gathered over context
    k, v = (sharding.constrain(x, ("batch", None, "kv_heads", "head_dim")) for x in (k, v))
    k_positions, k_segments = (sharding.constrain(x, ("batch", None))
                               for x in (positions, segment_ids))
    return reference_attention(q, k, v, document_mask(positions, segment_ids, k_positions,
                                                      k_segments))


def reference_attention(q, k, v, mask):
    """Plain XLA attention: q [B, T, H, E], k/v [B, S, K, E], mask [B, 1, 1, T, S] -> [B, T, H, E].

    Materialises the [B, K, G, T, S] scores; the other implementations are tested against it.
    """
    b, t, h, e = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, e)  # GQA: G query heads share one kv head
    scores = jnp.einsum("btkge,bske->bkgts", q, k).astype(jnp.float32) * e ** -0.5
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [B, K, G, T, S]
    return jnp.einsum("bkgts,bske->btkge", probs, v).reshape(b, t, h, e)


def blocked_attention(q, k, v, segment_ids, block=128):
    """The reference, one block of queries at a time over only the keys at or before it: the
    masked upper triangle is never computed, which halves attention's time on CPU at T=512."""
    t = q.shape[1]
    outs = []
    for start in range(0, t, block):
        stop = min(start + block, t)
        causal = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]  # [T, S] block
        same = segment_ids[:, start:stop, None] == segment_ids[:, None, :stop]
        mask = (causal[None] & same)[:, None, None]
        outs.append(reference_attention(q[:, start:stop], k[:, :stop], v[:, :stop], mask))
    return jnp.concatenate(outs, axis=1)


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
    block = min(512, t // sharding.parts("length"))  # a device's queries under context
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)

    def run(q, k, v, segment_ids):
        causal = masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(q.shape[2])])
        kernel = splash.make_splash_mha(causal, block_sizes=sizes, head_shards=1,
                                        q_seq_shards=1,
                                        interpret=device.platform != "tpu")
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, H, E] <-> [B, H, T, E]
        out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=s1))(
            heads_first(q) * e ** -0.5, heads_first(k), heads_first(v),
            splash.SegmentIds(q=segment_ids, kv=segment_ids))
        return heads_first(out)

    if placed is None or placed[0].size == 1:
        return run(q, k, v, segment_ids)
    _, spec = placed
    context = sharding.parts("length")
    if context > 1:
        return context_splash(q, k, v, segment_ids, spec, context, sizes,
                              device.platform != "tpu")
    # the trace's context mesh (sharding.traced_under): inside parallel.by_slice its
    # `slices` axis is already manual, and the kernel maps the others
    return jax.shard_map(run, mesh=jax.sharding.get_abstract_mesh(),
                         in_specs=(spec, spec, spec, P(*spec[:2])), out_specs=spec,
                         check_vma=False)(q, k, v, segment_ids)


def context_splash(q, k, v, segment_ids, spec, context, sizes, interpret):
    """Splash with the sequence split over context: each device keeps its queries (in
    parallel.balance's order) and gets every key and value (shard_map gathers them), which it
    puts back in sequence order, so the kernel's causal mask needs only the queries' places:
    its q_sequence, split over context with the kernel's block metadata (q_seq_shards)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash, splash_attention_mask as masks)
    from llama_jax import parallel  # parallel imports the model, which imports this module
    b, t, h, e = q.shape
    with jax.ensure_compile_time_eval():  # the queries' places, as numbers at trace time
        order = np.asarray(parallel.balance(np.arange(t)[None], context))[0].astype(np.int32)
    mesh = jax.sharding.get_abstract_mesh()
    causal = masks.CausalMask((t, t))
    causal.q_sequence = order
    local_heads = h // sharding.size_of(dict(mesh.shape), spec[2])
    kernel = splash.make_splash_mha(masks.MultiHeadMask([causal] * local_heads),
                                    block_sizes=sizes, head_shards=1, q_seq_shards=context,
                                    interpret=interpret)
    kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(None,
                                                                                 spec[1])))

    def run(q, k, v, q_segments, kv_segments, kernel):
        k, v, kv_segments = (parallel.unbalance(x, context) for x in (k, v, kv_segments))
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, H, E] <-> [B, H, T, E]
        out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=s1))(
            heads_first(q) * e ** -0.5, heads_first(k), heads_first(v),
            splash.SegmentIds(q=q_segments, kv=kv_segments))
        return heads_first(out)

    whole = P(spec[0], None, *spec[2:])  # keys and values: every position
    return jax.shard_map(run, mesh=mesh,
                         in_specs=(spec, whole, whole, P(*spec[:2]), P(spec[0], None),
                                   kernel_spec), out_specs=spec, check_vma=False)(
        q, k, v, segment_ids, segment_ids, kernel)


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
    batch fits PACKED_MAX_SEGMENTS, else as a dense [B, 1, T, S] bias, which costs ~8% of a 1B
    train step; lax.cond picks at run time, so both are compiled."""
    # jax exposes the packed layout only through this private module
    from jax._src.cudnn import fused_attention_stablehlo as fused

    def dense(q, k, v, segment_ids):
        same = None if segment_ids is None else \
            (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
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

    # before Hopper cuDNN has no packed layout, and lax.cond traces both branches
    if segment_ids is None or not fused.check_compute_capability("9.0"):
        return dense(q, k, v, segment_ids)
    return jax.lax.cond(packed_fits(segment_ids), packed, dense, q, k, v, segment_ids)


def causal_attention(q, k, v, segment_ids, impl, positions=None):
    """Causal self-attention over packed documents (segment_ids [B, T]; None: one document per
    row) with the named implementation; "xla" (and an unresolved "auto") runs the blocked
    reference, or with the sequence split over context (its tokens reordered) the reference
    masked by `positions` [B, T] (context_attention). Every implementation matches
    reference_attention."""
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids)
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids)
    if sharding.parts("length") > 1:
        return context_attention(q, k, v, positions, segment_ids)
    return blocked_attention(q, k, v, segment_ids)
