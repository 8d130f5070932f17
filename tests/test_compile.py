"""The ahead-of-time compile plan: the real train step compiled for a TPU topology on this CPU
machine (libtpu's compile-only devices, installed from requirements-test.txt)."""

import importlib.util

import pytest

from helpers import micro_config
from llama_jax import compile as compile_plan_lib


def test_micro_config_compiles_for_a_v5e_2x2_slice_and_fits():
    plan = compile_plan_lib.compile_plan(micro_config(), "v5e:2x2")
    assert plan["devices"] == 4 and plan["device_kind"] == "TPU v5 lite"
    assert plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    sizes = plan["bytes_per_device"]
    assert sizes["argument"] > 0 and sizes["temp"] > 0 and sizes["generated_code"] > 0
    # the state is donated: its outputs reuse the argument buffers
    assert sizes["alias"] > 0.9 * sizes["output"]
    assert plan["total_bytes_per_device"] >= sizes["argument"] + sizes["temp"]
    assert plan["fits"] is True and plan["hbm_gib"] == 16
    config = micro_config()
    tokens = config.data.global_batch_size * config.data.seq_len
    # 6 x (params - the 512 x 64 input embedding, a lookup) + 6 L T D, per token
    assert plan["flops_per_step"] == 6 * tokens * (plan["params"] - 512 * 64 + 2 * 32 * 64)
    assert plan["roofline_step_s"] == pytest.approx(plan["flops_per_step"] / (4 * 197e12),
                                                    rel=1e-3)


def test_splash_attention_compiles_for_tpu_inside_the_sharded_step():
    """On a TPU target the automatic attention is the splash kernel (Mosaic), run per device
    under shard_map; on a (fsdp 2, tensor 2) slice the real step must compile with it."""
    config = micro_config(max_seq_len=128)
    config.data.seq_len = 128
    config.mesh.update(data=1, fsdp=2, tensor=2)
    config.sharding_rules = "fsdp_tp"
    plan = compile_plan_lib.compile_plan(config, "v5e:2x2")
    assert plan["fits"] is True and plan["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert plan["attention"] == "splash"


def test_a_step_too_big_for_the_chip_does_not_fit():
    # 64 sequences of 2048 per chip: the [B, T, V] float32 logits alone take 16 GiB
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
