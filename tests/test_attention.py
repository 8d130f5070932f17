"""The attention implementations against the XLA reference, cuDNN's packed layout, and the
per-backend choice behind attention="auto"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.attention import (PACKED_MAX_SEGMENTS, attention_mask, blocked_attention,
                                 causal_attention, packed_fits, packed_segments,
                                 reference_attention, resolve_attention)
from llama_jax.model import ModelConfig


def test_auto_attention_resolves_per_platform_dtype_and_length():
    def pick(platform, seq_len=2048, **fields):
        cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, **fields)
        return resolve_attention(cfg, platform, seq_len).attention

    assert pick("gpu", dtype="bfloat16") == pick("gpu", dtype="float16") == "cudnn"
    assert pick("gpu", dtype="float32") == "xla"  # cuDNN's kernel takes 16-bit inputs only
    assert pick("tpu") == "splash"
    assert pick("tpu", 100) == "xla"  # splash's blocks are multiples of 128
    assert pick("tpu", None) == "xla"  # generation: prompt lengths vary
    assert pick("cpu", dtype="bfloat16") == "xla"
    assert pick("tpu", 100, attention="splash") == "splash"  # a chosen implementation is kept
    assert pick("cpu", attention="cudnn") == "cudnn"


def test_blocked_attention_equals_the_reference_with_documents_and_gqa():
    """The "xla" implementation skips the masked upper triangle block by block; it must be the
    reference's function, values and gradients, also when T is not a multiple of the block."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 200, 4, 16))
    k, v = (jax.random.normal(key, (2, 200, 2, 16)) for key in keys[1:])
    segment_ids = jnp.where(jnp.arange(200) < 70, 1, 2)[None].repeat(2, 0)

    def grads(fn):
        return jax.grad(lambda *x: jnp.sum(fn(*x) * jnp.arange(16)), argnums=(0, 1, 2))(q, k, v)

    ref = lambda *x: reference_attention(*x, attention_mask(segment_ids))
    blocked = lambda *x: blocked_attention(*x, segment_ids, block=64)
    np.testing.assert_allclose(blocked(q, k, v), ref(q, k, v), atol=1e-5)
    for got, want in zip(grads(blocked), grads(ref)):
        np.testing.assert_allclose(got, want, atol=1e-4)


def segments_from_packed(lengths, offsets, t):
    """Inverse of packed_segments as cuDNN reads it: [B, T] slot index of each position, -1
    where no used slot covers it."""
    pos = jnp.arange(t)[None, :, None]
    start, length = offsets[:, None, :-1], lengths[:, None, :]
    inside = (start >= 0) & (length >= 0) & (pos >= start) & (pos < start + length)
    return jnp.where(inside.any(-1), jnp.argmax(inside, -1), -1)


@pytest.mark.parametrize("row, lengths, offsets", [
    ([1] * 8, [8, -1, -1, -1], [0, -1, -1, -1, -1]),  # one document
    ([1, 1, 1, 2, 2, 3, 0, 0], [3, 2, 1, 2], [0, 3, 5, 6, -1]),  # three + trailing padding
    ([4, 4, 5, 5, 5, 5, 5, 5], [2, 6, -1, -1], [0, 2, -1, -1, -1]),  # ids need not start at 1
    ([0] * 8, [8, -1, -1, -1], [0, -1, -1, -1, -1]),  # an all-padding row is one segment
])
def test_packed_segments_gives_cudnn_lengths_and_offsets(row, lengths, offsets):
    """One slot per run of equal ids (padding too, so every position is computed); unused
    slots are -1, and so is the last offset: jax's wrapper appends the end itself."""
    got = packed_segments(jnp.array([row]), max_segments=4)
    np.testing.assert_array_equal(got[0], [lengths])
    np.testing.assert_array_equal(got[1], [offsets])
    assert got[0].dtype == got[1].dtype == jnp.int32
    assert bool(packed_fits(jnp.array([row]), max_segments=4))


def test_packed_fits_only_when_every_row_has_at_most_m_contiguous_documents():
    """Whatever packed_segments returns for a row that does not fit, the cond must pick the
    dense path for the whole batch."""
    fits = lambda *rows: bool(packed_fits(jnp.array(rows), max_segments=4))
    assert fits([1, 2, 3, 4, 4, 4, 4, 4])  # exactly M
    assert not fits([1, 2, 3, 4, 5, 5, 5, 5])  # M + 1
    assert not fits([1, 2, 3, 4, 0, 0, 0, 0])  # M documents + padding is M + 1 segments
    assert not fits([1, 1, 1, 1, 1, 1, 1, 1], [1, 2, 3, 4, 5, 6, 7, 8])  # one bad row is enough
    assert not fits([1, 1, 2, 2, 1, 1, 0, 0])  # a document that comes back is not one run


def test_packed_segments_cover_every_position_exactly_as_the_document_mask():
    t = 64
    cuts = jax.random.randint(jax.random.key(0), (6, 5), 1, t)  # up to 6 documents + padding
    ids = 1 + jnp.sum(jnp.arange(t)[None, :, None] >= cuts[:, None, :], axis=-1)
    ids = jnp.where(jnp.arange(t)[None] >= t - 3 * jnp.arange(6)[:, None], 0, ids)
    assert bool(packed_fits(ids, max_segments=7))
    slots = segments_from_packed(*packed_segments(ids, max_segments=7), t)
    assert bool(jnp.all(slots >= 0))
    np.testing.assert_array_equal(slots[:, :, None] == slots[:, None, :],
                                  ids[:, :, None] == ids[:, None, :])


def test_cudnn_attention_picks_packed_or_dense_and_matches_the_reference(monkeypatch):
    """The cuDNN kernel cannot run on CPU (it fails at trace time), so both kernels are
    emulated: the packed one from the lengths and offsets alone, as cuDNN reads them (positions
    no slot covers come out 0), the dense one by jax's XLA attention. Packed rows, grouped kv
    heads, and a batch with more than PACKED_MAX_SEGMENTS runs in a row (dense fallback)."""
    from jax._src.cudnn import fused_attention_stablehlo as fused
    e, t = 16, 64

    def packed_kernel(q, k, v, *, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale, mask_type):
        assert mask_type == fused.MaskType.PADDING_CAUSAL and scale == e ** -0.5
        assert k.shape == q.shape  # kv heads repeated to the query's (jax's kv-offset stride)
        assert q_seqlen.shape == (q.shape[0], PACKED_MAX_SEGMENTS)
        assert q_offsets.shape == (q.shape[0], PACKED_MAX_SEGMENTS + 1)
        slots = segments_from_packed(q_seqlen, q_offsets, t)
        mask = attention_mask(slots) & (slots >= 0)[:, None, None, :, None]
        return reference_attention(q, k, v, mask) * (slots >= 0)[:, :, None, None]

    dense_xla = jax.nn.dot_product_attention
    monkeypatch.setattr(fused, "dot_product_attention", packed_kernel)
    monkeypatch.setattr(fused, "check_compute_capability", lambda version: True)  # a Hopper
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, implementation, **kw: dense_xla(*a, **kw))
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (2, t, 4, e))
    k, v = (jax.random.normal(key, (2, t, 2, e)) for key in keys[1:])
    packed_ids = jnp.array([[1] * 20 + [2] * 30 + [0] * 14, [1] * 5 + [2] * 59])
    many_ids = packed_ids.at[1].set(1 + jnp.arange(t) // 3)  # 22 runs in row 1
    for ids, fits in ((packed_ids, True), (many_ids, False)):
        assert bool(packed_fits(ids)) == fits

        def grads(fn):
            return jax.grad(lambda *x: jnp.sum(fn(*x) * jnp.arange(e)), argnums=(0, 1, 2))(q, k, v)

        cudnn = jax.jit(lambda *x: causal_attention(*x, ids, "cudnn"))
        ref = lambda *x: reference_attention(*x, attention_mask(ids))
        np.testing.assert_allclose(cudnn(q, k, v), ref(q, k, v), atol=1e-5)
        for got, want in zip(grads(cudnn), grads(ref)):
            np.testing.assert_allclose(got, want, atol=1e-4)
