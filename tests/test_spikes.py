"""Loss-spike rewind and goodput: a poisoned batch in a local source spikes the loss; the run
rewinds to its last checkpoint, skips exactly the window from there to the spike, goes on, and a
resume from before the spike repeats every loss bit for bit. Both runs account their time."""

import json
import random
import shutil

import numpy as np
import pytest

from helpers import micro_config, train_tokenizer
from llama_jax import goodput, spikes
from llama_jax.data import corpus, pipeline
from llama_jax.data.tokenizer import load_tokenizer
from llama_jax.metrics import read_metrics
from llama_jax.train import train

SENTENCES = ["the cat sat on the mat and looked at the door.",
             "a dog ran to the park with a red ball.",
             "we read the book under the old tree today."]
STEPS, EVERY, SKIP = 24, 4, 2


def poisoned_corpus(path):
    """Clean repetitive lines, with a run of CJK characters (only byte-fallback pieces in this
    tokenizer, never seen elsewhere) about a third of the way into the run."""
    rng = random.Random(0)
    clean = [SENTENCES[i % 3] for i in range(400)]
    poison = ["".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(30)) for _ in range(3)]
    path.write_text("\n".join(clean[:140] + poison + clean[140:]) + "\n")


def spike_config(workdir):
    config = micro_config()
    data = workdir.parent
    config.data.sources = [dict(name="notes", files=str(data / "train.txt"), format="lines",
                                eval_files=str(data / "eval.txt"))]
    config.data.shuffle_buffer = 1  # the stream in file order, so the poison has one place
    config.train.update(steps=STEPS, lr=1e-2, warmup_steps=2, log_every=1, eval_every=100,
                        eval_batches=1, on_spike="rewind", spike_factor=2.0, spike_window=4,
                        spike_skip_batches=SKIP)
    config.checkpoint.update(every_steps=EVERY, keep=20)
    return config


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = tmp_path_factory.mktemp("spike")
    poisoned_corpus(data / "train.txt")
    (data / "eval.txt").write_text("\n".join(SENTENCES * 20) + "\n")
    (data / "a").mkdir()  # the workdir's cached tokenizer: quicker than one trained on the run
    train_tokenizer(corpus.stdlib_files("train")[:10], 512, data / "a" / "tokenizer.model", 5000)
    first = train(spike_config(data / "a"), data / "a")
    return data, first


def poisoned_batches(workdir, count):
    """1-based numbers of the stream's batches that hold a byte-fallback (poison) token."""
    config = spike_config(workdir)
    tokenizer = load_tokenizer(workdir / "tokenizer.model", 512)
    dataset = pipeline.make_dataset("train", config.data, tokenizer, 8)
    return [b for b, batch in enumerate(dataset.take(count).as_numpy_iterator(), start=1)
            if ((batch["inputs"] >= 3) & (batch["inputs"] < 259)).any()]


def test_a_spike_rewinds_and_skips_exactly_its_window(runs):
    data, summary = runs
    workdir = data / "a"
    [event] = json.loads((workdir / "data_skips.json").read_text())["skips"]
    spike, back = event["spike_step"], event["rewound_to"]
    poisoned = poisoned_batches(workdir, STEPS + 10)
    assert poisoned and spike == poisoned[0], (spike, poisoned)  # the first poisoned batch
    assert back == (spike - 1) // EVERY * EVERY  # the last checkpoint before the spike
    assert event["batches"] == [back + 1, spike + SKIP]
    assert set(poisoned) <= set(range(back + 1, spike + SKIP + 1))  # never trained on again
    assert event["loss"] > 2.0 * event["mean"]
    kept = losses(workdir)
    assert sorted(kept) == list(range(1, STEPS + 1)) and summary["steps"] == STEPS
    assert max(kept[s] for s in range(back + 1, STEPS + 1)) < 2.0 * event["mean"]
    [record] = [r for r in read_metrics(workdir) if "spike_step" in r]
    assert record == {"step": back, "spike_step": spike, "spike_loss": event["loss"],
                      "spike_mean": event["mean"], "rewound_to_step": back,
                      "skipped_first_batch": back + 1, "skipped_last_batch": spike + SKIP}
    assert spikes.batch_of_step(back + 1, [event["batches"]]) == spike + SKIP + 1
    tags = scalar_tags(workdir / "tensorboard")
    assert tags["spike/step"] == [back] and "spike/skipped_last_batch" in tags
    assert "goodput/productive_s" in tags and "goodput/rewound_s" in tags

    totals = summary["goodput"]
    assert totals["rewound_steps"] == spike - back and totals["rewound_s"] > 0
    for part in ("productive", "compile", "startup", "data_wait", "evaluation",
                 "checkpoint_save", "checkpoint_restore"):
        assert totals[part + "_s"] > 0, part
    assert abs(totals["unaccounted_s"]) < 0.03 * totals["wall_s"], totals
    assert abs(totals["wall_s"] - summary["wall_s"]) < 0.03 * summary["wall_s"]


def test_a_resume_from_before_the_spike_repeats_every_loss_and_counts_the_lost_steps(runs):
    data, _ = runs
    [event] = json.loads((data / "a" / "data_skips.json").read_text())["skips"]
    back = event["rewound_to"]
    workdir = data / "b"
    shutil.copytree(data / "a", workdir)
    for root in ("checkpoints", "data_state"):  # as if killed right after the rewind
        for path in (workdir / root).iterdir():
            if path.name.isdigit() and int(path.name) > back:
                shutil.rmtree(path)
    summary = train(spike_config(workdir), workdir)
    assert summary["first_step"] == back
    assert losses(workdir) == losses(data / "a")  # bit-identical floats, every step
    assert json.loads((workdir / "data_skips.json").read_text())["skips"] == [event]
    totals = summary["goodput"]
    assert totals["sessions"] == 2 and totals["lost_steps"] == STEPS - back
    assert totals["restart_lost_s"] > 0
    assert abs(totals["unaccounted_s"]) < 0.03 * totals["wall_s"], totals
    for session in json.loads((workdir / "goodput.json").read_text())["sessions"]:
        parts = session["parts"]  # each session's own time adds up too
        assert min(parts.values()) >= 0, parts
        spent = sum(parts.values()) - parts["restart_lost"]  # that part is an earlier session's
        assert abs(spent - session["wall_s"]) < 0.03 * session["wall_s"], session
    on_disk = goodput.read(workdir)
    assert on_disk["lost_steps"] == STEPS - back
    np.testing.assert_allclose(on_disk["wall_s"], totals["wall_s"], rtol=0.02)


def test_the_goodput_plot_is_a_stacked_bar(runs, tmp_path):
    from llama_jax.plot import goodput_figure
    fig = goodput_figure([runs[0] / "a"])
    bars = fig.axes[0].patches
    assert len(bars) == len(goodput.PARTS) + 1
    right = max(b.get_x() + b.get_width() for b in bars)
    np.testing.assert_allclose(right, goodput.read(runs[0] / "a")["wall_s"], rtol=0.03)
    fig.savefig(tmp_path / "goodput.png")
    assert (tmp_path / "goodput.png").stat().st_size > 1000


def scalar_tags(logdir):
    import tensorflow as tf
    tags = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags
