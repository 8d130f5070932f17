"""Checks every attention implementation this backend has against the XLA reference:
python bench/check_attention.py

Grouped kv heads, float32 reference on the same bf16-rounded inputs; forward output and the
gradients of q, k and v. Prints one JSON line per implementation and case, and exits non-zero
if any relative error (||out - ref|| / ||ref||) is over its tolerance or anything is not finite.
On CPU it checks splash attention through the Pallas interpreter; on GPU cuDNN; on TPU splash.

Cases (segment ids of the packed rows; 0 is padding at the end of a row):
  three_documents     three documents a row at random cuts (every backend)
  documents_padding   several documents and a trailing padding run (cuDNN: packed layout)
  many_documents      a row with more documents than cuDNN's packed layout is sized for
                      (cuDNN: the dense-bias fallback)
Padding query rows are left out of the output's error and get a zero output cotangent, so
they add nothing to the gradients; they must still come out finite.
"""

import json
import sys

import jax
import jax.numpy as jnp

from llama_jax.attention import (PACKED_MAX_SEGMENTS, attention_mask, causal_attention,
                                 packed_fits, reference_attention)

IMPLS = {"cpu": ["splash"], "gpu": ["cudnn"], "tpu": ["splash"]}
CASES = {"splash": ["three_documents"],
         "cudnn": ["three_documents", "documents_padding", "many_documents"]}
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # bf16 operands land between 1e-3 and 1e-2


def from_lengths(rows):
    """[[document lengths..., padding length], ...] -> [B, T] segment ids 1, 2, ..., then 0."""
    ids = [jnp.repeat(jnp.array(list(range(1, len(r))) + [0]), jnp.array(r)) for r in rows]
    return jnp.stack(ids).astype(jnp.int32)


def segment_ids_for(case, b, t, key):
    pos = jnp.arange(t)[None]
    cut = jax.random.randint(key, (b, 2), 1, t)  # two random cuts: three documents a row
    three = 1 + (pos >= cut.min(1, keepdims=True)) + (pos >= cut.max(1, keepdims=True))
    if case == "three_documents":
        return three
    if case == "documents_padding":
        assert (b, t) == (2, 1024)
        return from_lengths([[300, 200, 400, 124], [1, 511, 256, 56, 200]])
    many = 1 + pos[0] * (PACKED_MAX_SEGMENTS + 4) // t  # evenly cut, more than the layout takes
    return three.at[0].set(many)


def main():
    b, t, h, k, e = 2, 1024, 8, 2, 128
    keys = jax.random.split(jax.random.key(1), 4)
    q, kk, v = (jax.random.normal(key, (b, t, n, e)) for key, n in zip(keys, (h, k, k)))
    dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"  # cuDNN: 16-bit only
    q, kk, v = (x.astype(dtype) for x in (q, kk, v))
    failed = False
    for impl in IMPLS[jax.default_backend()]:
        for case in CASES[impl]:
            segment_ids = segment_ids_for(case, b, t, keys[3])
            real = (segment_ids != 0)[:, :, None, None]  # query rows that are not padding
            probe = jax.random.normal(jax.random.key(2), (b, t, h, e)) * real  # a cotangent

            def loss(fn, *qkv):
                return jnp.sum(fn(*qkv).astype(jnp.float32) * probe)

            ref = lambda *x: reference_attention(*(y.astype(jnp.float32) for y in x),
                                                 attention_mask(segment_ids))
            want = (ref(q, kk, v), *jax.grad(lambda *x: loss(ref, *x), argnums=(0, 1, 2))(q, kk, v))
            fn = lambda *x, impl=impl: causal_attention(*x, segment_ids, impl)
            got = jax.jit(lambda *x: (fn(*x), *jax.grad(lambda *y: loss(fn, *y),
                                                         argnums=(0, 1, 2))(*x)))(q, kk, v)
            finite = all(bool(jnp.all(jnp.isfinite(g))) for g in got)
            got, want = (got[0] * real, *got[1:]), (want[0] * real, *want[1:])
            errors = {name: float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w))
                      for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
            ok = finite and max(errors.values()) <= TOLERANCE[dtype]
            failed |= not ok
            line = {"implementation": impl, "case": case, "backend": jax.default_backend(),
                    "dtype": dtype, "shape": [b, t, h, k, e], "relative_error": errors,
                    "finite": finite, "tolerance": TOLERANCE[dtype], "ok": ok}
            if impl == "cudnn":  # which branch the run-time cond takes for this batch
                line["path"] = "packed" if bool(packed_fits(segment_ids)) else "dense_bias"
            print(json.dumps(line), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
