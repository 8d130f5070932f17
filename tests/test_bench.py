"""The benchmark command's synthetic batch and its JSON on a micro model."""

import math

import numpy as np

from helpers import micro_config
from llama_jax import bench, sharding, train_step


def test_synthetic_batch_packs_equal_documents_with_restarting_positions():
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
    batch = bench.synthetic_batch(mesh, 8, 12, 100, documents=3)
    np.testing.assert_array_equal(batch["segment_ids"][1], [1] * 4 + [2] * 4 + [3] * 4)
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3] * 3)
    one = bench.synthetic_batch(mesh, 8, 12, 100, documents=1)
    np.testing.assert_array_equal(one["segment_ids"], np.ones((8, 12)))
    np.testing.assert_array_equal(one["positions"][0], np.arange(12))
    assert "segment_ids" not in bench.synthetic_batch(mesh, 8, 12, 100, documents=0)


def test_bench_reports_throughput_mfu_and_memory_on_a_sharded_mesh():
    config = micro_config()
    config.mesh.update(data=2, fsdp=2, tensor=2)
    result = bench.bench(config, steps=2, documents=2)
    assert result["devices"].startswith("8 x")
    assert result["config"]["documents"] == 2
    assert result["compiled_temp_mib"] > 0 and result["compile_s"] > 0
    step_tokens = config.data.global_batch_size * config.data.seq_len
    assert math.isclose(result["tokens_per_sec"], step_tokens / result["step_time_s"], rel_tol=1e-2)
    assert 0 < result["mfu"] and math.isfinite(result["final_loss"])
    cfg = train_step.build(config, sharding.make_mesh(config.mesh)).cfg
    assert result["flops_per_token"] == cfg.flops_per_token(config.data.seq_len)
    compile_only = bench.bench(config, steps=0)
    assert "tokens_per_sec" not in compile_only and compile_only["compiled_temp_mib"] > 0
