from absl import logging

from llama_jax import metrics


def lines(caplog):
    """What the writer logged (TensorFlow logs its own records while it loads)."""
    return [r.getMessage() for r in caplog.records if r.pathname == metrics.__file__]


def test_one_short_line_per_train_record_and_mfu_only_where_meaningful(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    writer = metrics.MetricsWriter(tmp_path, total_steps=100)
    writer.write(25, {"loss": 3.25, "tokens_per_sec": 1234.0, "mfu": 0.4, "step_time_s": 2.0})
    writer.write(25, {"eval_loss": 3.5}, prefix="eval")  # the trainer says which batches
    writer.close()
    assert lines(caplog) == ["step 25/100 | loss 3.2500 | 1,234 tok/s | MFU 40.0% | "
                               "ETA 2m30s"]  # 75 steps left at 2 s a step
    assert metrics.read_metrics(tmp_path) == [
        {"step": 25, "loss": 3.25, "tokens_per_sec": 1234.0, "mfu": 0.4, "step_time_s": 2.0},
        {"step": 25, "eval_loss": 3.5}]

    caplog.clear()  # on CPU the trainer leaves MFU off the line; metrics.jsonl still has it
    writer = metrics.MetricsWriter(tmp_path / "cpu", total_steps=100, show_mfu=False)
    writer.write(1, {"loss": 1.0, "mfu": 0.9})
    writer.close()
    assert lines(caplog) == ["step 1/100 | loss 1.0000"]
    assert metrics.read_metrics(tmp_path / "cpu")[0]["mfu"] == 0.9


def test_other_processes_write_nothing(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_peak_flops_is_measured_on_cpu_and_known_for_accelerators():
    class Chip:
        platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"
    assert metrics.peak_flops(Chip()) == (989e12, "NVIDIA H100 80GB HBM3 bf16 datasheet")
    peak, source = metrics.peak_flops(__import__("jax").devices()[0])
    assert 1e9 < peak < 1e13 and source == "measured float32 matmul"
