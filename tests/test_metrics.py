import io

from llama_jax import metrics


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_on_a_terminal_only(tmp_path, monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(metrics.sys, "stderr", terminal)
    writer = metrics.MetricsWriter(tmp_path, total_steps=100)
    writer.write(25, {"loss": 3.25, "tokens_per_sec": 1234.0, "mfu": 0.4})
    writer.close()
    line = terminal.getvalue()
    assert line.startswith("\rstep 25/100  loss 3.2500  1,234 tok/s  MFU 40.0%  ETA ")
    assert metrics.read_metrics(tmp_path) == [
        {"step": 25, "loss": 3.25, "tokens_per_sec": 1234.0, "mfu": 0.4}]

    pipe = io.StringIO()  # not a TTY: nothing but the log
    monkeypatch.setattr(metrics.sys, "stderr", pipe)
    writer = metrics.MetricsWriter(tmp_path / "b", total_steps=100)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert pipe.getvalue() == ""


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
