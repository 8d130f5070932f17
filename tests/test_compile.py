"""The ahead-of-time compile plan: the real train step compiled for a TPU topology on this CPU
machine (libtpu's compile-only devices, installed from requirements-test.txt)."""

import importlib.util

import pytest

from helpers import micro_config
from llama_jax import compile as compile_plan_lib
from llama_jax.config import model_config

# REFERENCE.md: TPU v5e has 16 GiB of HBM and a bf16 peak of 197 TFLOP/s per chip
V5E_HBM_GIB, V5E_PEAK = 16, 197e12
PER_CHIP_BATCH = 2


def aligned_config(chips):
    """A micro model whose every sharded dim is a multiple of TPU's (8, 128) tiles, so XLA's
    buffers hold no layout padding and their sizes can be checked against the tree's bytes."""
    config = micro_config(vocab_size=512, dim=256, n_heads=2, n_kv_heads=2, ffn_dim=512)
    config.data.global_batch_size = PER_CHIP_BATCH * chips
    return config


@pytest.fixture(scope="module")
def plans():
    """The same model planned for 4 and 8 v5e chips, each with the same batch per chip."""
    return {4: compile_plan_lib.compile_plan(aligned_config(4), "v5e:2x2"),
            8: compile_plan_lib.compile_plan(aligned_config(8), "v5e:2x4")}


def test_the_plan_for_a_v5e_2x2_slice_holds_the_state_sharded_four_ways(plans):
    plan, config = plans[4], aligned_config(4)
    assert plan["devices"] == 4 and plan["device_kind"] == "TPU v5 lite"
    assert plan["mesh"] == {"slices": 1, "data": 1, "fsdp": 4, "context": 1, "tensor": 1}
    sizes = plan["bytes_per_device"]
    # arguments: float32 parameters and AdamW's two moments of each, and the five [B, T] 4-byte
    # batch arrays, all split over 4 chips; only the norm scales (0.2% of it) are replicated
    cfg = model_config(config)
    state = 3 * 4 * cfg.num_params()
    batch = 5 * 4 * config.data.global_batch_size * config.data.seq_len
    assert sizes["argument"] == pytest.approx((state + batch) / 4, rel=0.01)
    assert sizes["temp"] > 0 and sizes["generated_code"] > 0
    # the state is donated: its outputs reuse the argument buffers
    assert sizes["alias"] > 0.9 * sizes["output"]
    assert plan["total_bytes_per_device"] >= sizes["argument"] + sizes["temp"]
    assert plan["hbm_gib"] == V5E_HBM_GIB
    assert plan["total_bytes_per_device"] <= V5E_HBM_GIB * 2**30 and plan["fits"] is True
    # the roofline is the step's FLOPs at the peak of all 4 chips
    assert plan["roofline_step_s"] == pytest.approx(plan["flops_per_step"] / (4 * V5E_PEAK),
                                                    rel=1e-3)


def test_under_fsdp_per_chip_state_falls_as_one_over_chips_and_activations_do_not_grow(plans):
    """REFERENCE.md's memory anchor: the per-chip argument memory falls as 1/chips, and the
    activation memory follows the per-chip batch only, never the global batch."""
    four, eight = plans[4], plans[8]
    assert eight["mesh"] == {"slices": 1, "data": 1, "fsdp": 8, "context": 1, "tensor": 1}
    assert four["bytes_per_device"]["argument"] == pytest.approx(
        2 * eight["bytes_per_device"]["argument"], rel=0.02)
    # twice the global batch on twice the chips: no more temporaries per chip (measured with
    # the 3-D attention contractions: 5.55 MB on 8 chips, 5.90 on 4; 5.94 on both before)
    assert eight["bytes_per_device"]["temp"] <= 1.05 * four["bytes_per_device"]["temp"]
    # twice the global batch is twice the FLOPs, on twice the chips in the same time
    assert eight["flops_per_step"] == 2 * four["flops_per_step"]
    assert eight["roofline_step_s"] == four["roofline_step_s"]


def test_splash_attention_compiles_for_tpu_inside_the_sharded_step():
    """On a TPU target the automatic attention is the splash kernel (Mosaic), run per device
    under shard_map; on a (fsdp 2, tensor 2) slice the real step must compile with it."""
    config = micro_config(max_seq_len=128)
    config.data.seq_len = 128
    config.mesh.update(data=1, fsdp=2, tensor=2)
    config.sharding_rules = "fsdp_tp"
    plan = compile_plan_lib.compile_plan(config, "v5e:2x2")
    assert plan["fits"] is True and plan["mesh"] == {"slices": 1, "data": 1, "fsdp": 2,
                                                     "context": 1, "tensor": 2}
    assert plan["attention"] == "splash"


def test_a_step_too_big_for_the_chip_does_not_fit():
    # 64 sequences of 2048 per chip: the [B, T, V] float32 logits alone take 15.6 of the
    # chip's 16 GiB, before any other activation
    config = micro_config(vocab_size=32000, max_seq_len=2048)
    config.data.update(seq_len=2048, global_batch_size=256)
    plan = compile_plan_lib.compile_plan(config, "v5e:2x2")
    assert plan["fits"] is False
    assert "exceeds available HBM" in plan["compiler_error"]  # the TPU compiler refused it


def test_without_libtpu_it_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs libtpu.*pip install 'llama_jax\[tpu\]'"):
        compile_plan_lib.compile_plan(micro_config(), "v5e:2x2")


def test_an_unknown_topology_is_one_clear_error():
    with pytest.raises(ValueError, match="GENERATION:CHIPS"):
        compile_plan_lib.compile_plan(micro_config(), "h100:8")
