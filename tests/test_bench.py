"""The benchmark command's synthetic batch and its JSON on a micro model."""

import json

import jax
import numpy as np
import pytest

from helpers import micro_config
from llama_jax import bench, sharding, train_step
from llama_jax.config import model_config
from llama_jax.metrics import peak_flops


def test_synthetic_batch_packs_equal_documents_with_restarting_positions():
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
    batch = bench.synthetic_batch(mesh, 8, 12, 100, documents=3)
    np.testing.assert_array_equal(batch["segment_ids"][1], [1] * 4 + [2] * 4 + [3] * 4)
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3] * 3)
    one = bench.synthetic_batch(mesh, 8, 12, 100, documents=1)
    np.testing.assert_array_equal(one["segment_ids"], np.ones((8, 12)))
    np.testing.assert_array_equal(one["positions"][0], np.arange(12))
    assert "segment_ids" not in bench.synthetic_batch(mesh, 8, 12, 100, documents=0)


# what each JSON field is, so a consumer (bench/results, a dashboard) can rely on it
FIELD_TYPES = {
    "config": dict, "devices": str, "compile_s": float, "compiled_temp_mib": float,
    "compiled_argument_mib": float, "tokens_per_sec": float, "step_time_s": float,
    "step_time_min_max_s": list, "flops_per_token": int, "achieved_gflops_per_sec": float,
    "peak_gflops_per_sec": float, "peak_source": str, "mfu": float, "final_loss": float,
    "peak_host_rss_mib": float, "device_peak_bytes_in_use": (int, type(None))}


def test_bench_times_the_real_step_and_reports_mfu_against_all_devices_peak():
    config = micro_config()
    config.mesh.update(data=2, fsdp=2, tensor=2)
    steps = 3
    result = bench.bench(config, steps=steps, documents=2)
    assert result["devices"].startswith("8 x")
    assert result["config"]["documents"] == 2 and result["config"]["mesh"] == {
        "slices": 1, "data": 2, "fsdp": 2, "context": 1, "tensor": 2}

    # the same step from the same init on the same batch, run by hand: bench's final loss is
    # that of the call after one warm-up and `steps` timed steps, and one step more or fewer
    # would show, since the loss moves every step from the second on (warmup starts at lr 0)
    step = train_step.build(config, sharding.make_mesh(config.mesh))
    batch = bench.synthetic_batch(step.mesh, config.data.global_batch_size,
                                  config.data.seq_len, config.model.vocab_size, documents=2)
    state, losses = step.init(jax.random.key(0)), []
    for _ in range(steps + 2):
        state, metrics = step.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert result["final_loss"] == pytest.approx(losses[steps], abs=1e-4)
    assert abs(losses[steps] - losses[steps - 1]) > 1e-2
    assert abs(losses[steps + 1] - losses[steps]) > 1e-2

    fastest, slowest = result["step_time_min_max_s"]
    assert 0 < fastest <= result["step_time_s"] <= slowest  # the median of the timed steps
    # MFU (REFERENCE.md): tokens/s x flops_per_token over the peak of all 8 devices, the peak
    # on CPU being the matmul measured once per process
    peak, source = peak_flops(jax.devices()[0])
    assert result["peak_source"] == source == "measured float32 matmul"
    assert result["peak_gflops_per_sec"] == pytest.approx(8 * peak / 1e9, abs=0.1)
    assert result["flops_per_token"] == model_config(config).flops_per_token(config.data.seq_len)
    assert result["mfu"] == pytest.approx(
        result["tokens_per_sec"] * result["flops_per_token"] / (8 * peak), abs=1e-4)

    assert json.loads(json.dumps(result)) == result
    assert {k: type(v) for k, v in result.items() if not isinstance(v, FIELD_TYPES[k])} == {}
    assert set(result) == set(FIELD_TYPES)

    compile_only = bench.bench(config, steps=0)
    assert "tokens_per_sec" not in compile_only and compile_only["compiled_temp_mib"] > 0
