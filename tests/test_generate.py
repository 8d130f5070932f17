"""KV-cache generation: cached decoding must equal recomputing the whole prefix each step."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import generate as gen, parallel
from llama_jax.model import Llama, ModelConfig

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=64, remat="none", dtype="float32")
PROMPTS = [[1, 5, 9, 13, 40, 2, 7], [1, 30], [1, 8, 8, 8, 8, 60, 61, 62, 63, 64, 3, 4]]


def params_for(cfg, seed=0):
    """Random parameters without running init (whose eager scan compiles for seconds)."""
    shapes = jax.eval_shape(lambda: nn.unbox(Llama(cfg).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (rng.uniform(0.5, 1.5, s.shape) if path[-1].key == "scale"
                         else rng.normal(0, 0.2, s.shape)).astype(np.float32), shapes)


def greedy_by_recomputation(cfg, params, prompts, steps):
    """Each step reruns the full prefix (right-padded to a fixed width: causality makes the
    padding invisible) and takes the argmax at each row's last real position."""
    apply = jax.jit(lambda p, t: Llama(cfg).apply({"params": p}, t))
    seqs = [list(p) for p in prompts]
    width = max(map(len, prompts)) + steps
    for _ in range(steps):
        tokens = np.zeros((len(seqs), width), np.int32)
        for row, seq in enumerate(seqs):
            tokens[row, :len(seq)] = seq
        logits = np.asarray(apply(params, tokens))
        for row, seq in enumerate(seqs):
            seq.append(int(logits[row, len(seq) - 1].argmax()))
    return [seq[len(p):] for seq, p in zip(seqs, prompts)]


# Every generate() call below uses the same prompts and max_new_tokens=32, so they share one
# compiled prefill and decode step (the slow part on CPU).
# Llama 3.2's shape in miniature: tied embeddings, llama3 RoPE with a context (16) that the
# 32 generated tokens run past
LLAMA32 = dataclasses.replace(CFG, tie_embeddings=True, rope_scaling="llama3",
                              rope_scaling_factor=32.0, rope_original_max_seq_len=16)


@pytest.mark.parametrize("cfg", [CFG, LLAMA32], ids=["llama", "llama32"])
def test_cached_greedy_equals_full_recomputation_for_32_steps(cfg):
    params = params_for(cfg)
    cached = gen.generate(cfg, params, PROMPTS, max_new_tokens=32)
    assert [len(c) for c in cached] == [32, 32, 32]
    assert cached == greedy_by_recomputation(cfg, params, PROMPTS, 32)
    assert len({tuple(c) for c in cached}) == 3  # rows differ: no row saw another's tokens


def test_cached_prefill_and_step_logits_match_the_full_forward():
    cfg = dataclasses.replace(CFG, scan_layers=False)  # the unrolled layer path, with a cache
    params = params_for(cfg, seed=1)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    full = np.asarray(Llama(cfg).apply({"params": params}, tokens))
    cache = gen.init_cache(cfg, 2, 32)
    apply = jax.jit(lambda t, p, c: Llama(cfg).apply({"params": params}, t, p, None, cache=c))
    pre, cache = apply(tokens[:, :12], jnp.broadcast_to(jnp.arange(12), (2, 12)), cache)
    steps = [pre]
    for t in range(12, 20):
        logits, cache = apply(tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
        steps.append(logits)
    assert int(cache["index"]) == 20
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_sampling_is_seeded_and_its_cuts_work():
    params = params_for(CFG)
    greedy = gen.generate(CFG, params, PROMPTS, 32)
    hot = gen.Sampling(temperature=1.0)
    a = gen.generate(CFG, params, PROMPTS, 32, hot, seed=3)
    assert a == gen.generate(CFG, params, PROMPTS, 32, hot, seed=3)
    assert a != gen.generate(CFG, params, PROMPTS, 32, hot, seed=4)
    assert a != greedy
    # a single surviving candidate makes sampling greedy
    assert gen.generate(CFG, params, PROMPTS, 32, gen.Sampling(1.0, top_k=1), seed=5) == greedy
    assert gen.generate(CFG, params, PROMPTS, 32, gen.Sampling(1.0, top_p=1e-6), seed=5) == greedy
    # other prompt lengths in the same bucket and other settings reuse the compiled steps
    compiled = (gen._prefill._cache_size(), gen._decode._cache_size())
    gen.generate(CFG, params, [[1, 2], [3] * 15, [4] * 9], 32, gen.Sampling(0.5, 3, 0.8))
    assert (gen._prefill._cache_size(), gen._decode._cache_size()) == compiled
    # a new bucket (prompt of 17 -> 32 slots, batch of 1) compiles each function once more
    gen.generate(CFG, params, [[1] * 17], 32)
    assert (gen._prefill._cache_size(), gen._decode._cache_size()) == (compiled[0] + 1,
                                                                       compiled[1] + 1)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = jax.jit(jax.vmap(lambda k, t, top_k, top_p: gen.sample(logits, k, t, top_k, top_p),
                            in_axes=(0, None, None, None)))

    def seen(temperature, top_k, top_p):
        return set(np.asarray(draw(keys, temperature, top_k, top_p)).ravel().tolist())

    assert seen(1.0, 0, 1.0) == {0, 1, 2, 3}
    assert seen(1.0, 2, 1.0) == {0, 1}
    assert seen(1.0, 0, 0.7) == {0, 1}
    assert seen(1.0, 0, 0.9) == {0, 1, 2}
    assert seen(1.0, 3, 0.99) == {0, 1, 2}  # top-k first, then top-p over what is left
    assert seen(0.0, 0, 1.0) == {0}


def test_stops_at_eos_per_row_and_rejects_long_prompts():
    params = params_for(CFG)
    greedy = gen.generate(CFG, params, PROMPTS, 32)
    eos = greedy[0][3]  # row 0 meets it at step 3; the others stop only if they meet it too
    stopped = gen.generate(CFG, params, PROMPTS, 32, eos_id=eos)
    for full, out in zip(greedy, stopped):
        assert out == (full[:full.index(eos)] if eos in full else full)
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.generate(CFG, params, [list(range(60))], 10)


def test_parameters_sharded_over_8_devices_generate_the_same_tokens():
    params = params_for(CFG)
    placed = parallel.place(CFG, params)
    wq = placed["layers"]["attention"]["wq"]  # [L, D, H, E]: D split over fsdp (x context)
    assert len(wq.sharding.device_set) == 8 and wq.sharding.spec[1] == ("fsdp", "context")
    assert wq.addressable_shards[0].data.shape == (2, 32 // 8, 4, 8)
    assert gen.generate(CFG, placed, PROMPTS, 32) == gen.generate(CFG, params, PROMPTS, 32)
