import json

import pytest

from helpers import micro_config
from llama_jax import scaling
from llama_jax.metrics import read_metrics

BUDGET = 2.5e9


def test_micro_study_allocates_the_budget_and_writes_the_table(tmp_path):
    base = micro_config()  # vocab 512, head dim 16, 8 x 32-token batches
    study = scaling.run_study(base, BUDGET, ["64x2", "32x1"], tmp_path)
    small, large = study["results"]  # sorted by size
    tokens_per_step = 8 * 32
    # by hand: 2*V*D + L*(4*D^2 + 3*D*F + 2*D) + D with F = 96 / 192 (8/3 D up to a multiple of 32)
    assert (small["size"], small["params"], small["n_heads"], small["ffn_dim"]) == (
        "32x1", 46176, 2, 96)
    assert (large["size"], large["params"], large["n_heads"], large["ffn_dim"]) == (
        "64x2", 172352, 4, 192)
    assert [small["steps"], large["steps"]] == [53, 11]
    for r in (small, large):
        # the input embedding (512 x dim) is a lookup: no FLOPs
        assert r["flops_per_token"] == 6 * (r["params"] - 512 * r["dim"]) + \
            6 * r["n_layers"] * 32 * r["dim"]
        assert r["tokens"] == r["steps"] * tokens_per_step
        assert abs(r["tokens"] * r["flops_per_token"] - BUDGET) <= (
            0.5 * tokens_per_step * r["flops_per_token"])
        records = read_metrics(tmp_path / r["size"])
        evals = [x for x in records if "eval_loss" in x]
        assert evals[-1] == {"step": r["steps"], "eval_loss": r["final_eval_loss"]}
        assert r["final_eval_loss"] < evals[0]["eval_loss"] - 0.2
        # warmup and cosine over this run's own steps: the peak is reached, then decays to ~10%
        lrs = [x["learning_rate"] for x in records if "learning_rate" in x]
        assert max(lrs) == pytest.approx(base.train.lr, rel=1e-6)
        assert lrs[-1] < 0.15 * base.train.lr
        # one tokenizer for all sizes, so all are evaluated on the same validation tokens
        assert (tmp_path / r["size"] / "tokenizer.model").read_bytes() == (
            tmp_path / "tokenizer.model").read_bytes()

    assert json.loads((tmp_path / "scaling.json").read_text())["results"] == study["results"]
    table = (tmp_path / "scaling.md").read_text()
    assert "| 32x1 | 13,408 | 46,176 | 13,568 | 0.29 | 53 | 2.51e+09 |" in table
    assert "| 64x2 | 106,816 | 172,352 | 2,816 | 0.02 | 11 | 2.43e+09 |" in table
    best = min(small["final_eval_loss"], large["final_eval_loss"])
    assert f"**{best:.3f}**" in table
    assert (tmp_path / "scaling.png").stat().st_size > 10_000

    # rerunning skips the finished sizes: nothing is trained or logged again
    before = (tmp_path / "32x1" / "metrics.jsonl").read_text()
    again = scaling.run_study(base, BUDGET, ["32x1", "64x2"], tmp_path)
    assert again["results"] == study["results"]
    assert (tmp_path / "32x1" / "metrics.jsonl").read_text() == before
    with pytest.raises(ValueError, match="another --budget or config"):
        scaling.run_study(base, 2 * BUDGET, ["32x1"], tmp_path)


def test_bad_sizes_and_budgets_are_one_line_errors():
    base = micro_config()
    with pytest.raises(ValueError, match=r"'64-2' is not DIMxLAYERS"):
        scaling.size_config(base, "64-2", BUDGET)
    with pytest.raises(ValueError, match=r"dim 40 does not split into heads of 16"):
        scaling.size_config(base, "40x1", BUDGET)
    with pytest.raises(ValueError, match=r"buys 0 steps of size 64x2 .* raise --budget"):
        scaling.size_config(base, "64x2", 1e7)
