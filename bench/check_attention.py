"""Checks every attention implementation this backend has against the XLA reference:
python bench/check_attention.py

Packed rows (three documents each), grouped kv heads, float32 reference on the same bf16-rounded
inputs; forward output and the gradients of q, k and v. Prints one JSON line per implementation
and exits non-zero if any relative error (||out - ref|| / ||ref||) is over its tolerance.
On CPU it checks splash attention through the Pallas interpreter; on GPU cuDNN; on TPU splash.
"""

import json
import sys

import jax
import jax.numpy as jnp

from llama_jax.model import attention_mask, causal_attention, reference_attention

IMPLS = {"cpu": ["splash"], "gpu": ["cudnn"], "tpu": ["splash"]}
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # bf16 operands land between 1e-3 and 1e-2


def main():
    b, t, h, k, e = 2, 1024, 8, 2, 128
    keys = jax.random.split(jax.random.key(1), 4)
    q, kk, v = (jax.random.normal(key, (b, t, n, e)) for key, n in zip(keys, (h, k, k)))
    cut = jax.random.randint(keys[3], (b, 2), 1, t)  # two random cuts: three documents a row
    segment_ids = 1 + (jnp.arange(t)[None] >= cut.min(1, keepdims=True)) + \
        (jnp.arange(t)[None] >= cut.max(1, keepdims=True))
    dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"  # cuDNN: 16-bit only
    q, kk, v = (x.astype(dtype) for x in (q, kk, v))
    probe = jax.random.normal(jax.random.key(2), (b, t, h, e))  # a random output cotangent

    def loss(fn, *qkv):
        return jnp.sum(fn(*qkv).astype(jnp.float32) * probe)

    ref = lambda *x: reference_attention(*(y.astype(jnp.float32) for y in x),
                                         attention_mask(segment_ids))
    want = (ref(q, kk, v), *jax.grad(lambda *x: loss(ref, *x), argnums=(0, 1, 2))(q, kk, v))
    failed = False
    for impl in IMPLS[jax.default_backend()]:
        fn = lambda *x, impl=impl: causal_attention(*x, segment_ids, impl)
        got = jax.jit(lambda *x: (fn(*x), *jax.grad(lambda *y: loss(fn, *y),
                                                     argnums=(0, 1, 2))(*x)))(q, kk, v)
        errors = {name: float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w))
                  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
        ok = max(errors.values()) <= TOLERANCE[dtype]
        failed |= not ok
        print(json.dumps({"implementation": impl, "backend": jax.default_backend(),
                          "dtype": dtype, "shape": [b, t, h, k, e], "relative_error": errors,
                          "tolerance": TOLERANCE[dtype], "ok": ok}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
