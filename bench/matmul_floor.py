"""The matmul floor of one cpu-bench train step: every matrix multiply the step must do (forward,
and both backward products of each), timed alone, summed, for XLA and for PyTorch on this CPU.

  python bench/matmul_floor.py [--repeats=5]

A train step cannot run faster than its matmuls, so tokens / floor is the most either library
could reach at cpu-bench with its own matmul kernels; the ratio of a measured step to its floor
is everything else (attention softmax, norms, the optimizer, scheduling). Attention's two
batched products per layer are counted at the causal half (the blocked `xla` attention does
5/8 of the full products). Prints one JSON line; needs torch (the test extras).
"""

import argparse
import json
import sys
import time

SHAPE = dict(vocab=32000, dim=512, layers=8, heads=8, ffn=1536, seq=512, batch=8)


def gemms():
    """[(count, batch, m, k, n)] of one step: C[m, n] = A[m, k] @ B[k, n], `batch` at a time."""
    n, d, f, v = SHAPE["batch"] * SHAPE["seq"], SHAPE["dim"], SHAPE["ffn"], SHAPE["vocab"]
    layers, t, heads = SHAPE["layers"], SHAPE["seq"], SHAPE["heads"]
    e, bh = d // heads, SHAPE["batch"] * heads
    forward = [(4 * layers, 1, n, d, d), (2 * layers, 1, n, d, f), (layers, 1, n, f, d),
               (1, 1, n, d, v)]
    out = []
    for count, b, m, k, nn in forward:  # forward, input gradient, weight gradient
        out += [(count, b, m, k, nn), (count, b, m, nn, k), (count, b, k, m, nn)]
    # attention per layer: scores q k^T and probs v forward, two products each backward
    out += [(3 * layers, bh, t, e, t), (3 * layers, bh, t, t, e)]
    return out


def time_jax(repeats):
    import jax
    import jax.numpy as jnp
    total = 0.0
    for count, b, m, k, n in gemms():
        x, y = jnp.ones((b, m, k), jnp.float32), jnp.ones((b, k, n), jnp.float32)
        f = jax.jit(lambda x, y: jnp.einsum("bmk,bkn->bmn", x, y))
        f(x, y).block_until_ready()
        best = min(_timed(lambda: f(x, y).block_until_ready()) for _ in range(repeats))
        total += count * best * (0.5 if b > 1 else 1.0)  # causal attention: half the products
    return total


def time_torch(repeats):
    import torch
    total = 0.0
    for count, b, m, k, n in gemms():
        x, y = torch.ones(b, m, k), torch.ones(b, k, n)
        torch.bmm(x, y)
        best = min(_timed(lambda: torch.bmm(x, y)) for _ in range(repeats))
        total += count * best * (0.5 if b > 1 else 1.0)
    return total


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--library", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be 1 or more (the floor takes the best of that many runs)")
    tokens = SHAPE["batch"] * SHAPE["seq"]
    flops = sum(c * b * 2 * m * k * n * (0.5 if b > 1 else 1.0) for c, b, m, k, n in gemms())
    result = {"shape": SHAPE, "matmul_gflop_per_step": round(flops / 1e9, 1)}
    if args.library:  # each library in its own process, so neither's threads disturb the other
        floor = (time_jax if args.library == "jax" else time_torch)(args.repeats)
        print(json.dumps({"floor_s": round(floor, 3)}))
        return
    import subprocess
    for library in ("jax", "torch"):
        out = subprocess.run([sys.executable, __file__, f"--library={library}",
                              f"--repeats={args.repeats}"], capture_output=True, text=True,
                             check=True).stdout
        floor = json.loads(out.strip().splitlines()[-1])["floor_s"]
        result[library] = {"floor_s": floor, "max_tokens_per_sec": round(tokens / floor, 1),
                           "gflops_per_sec": round(flops / floor / 1e9, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
