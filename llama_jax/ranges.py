"""The valid range of every setting, in one place: each key of base_config(), of a data.sources
entry, and each numeric or enumerated flag of the entry points, with the fix to print. Checked
before anything is compiled, trained or written; a value outside its range is one line that
names the key, the value, the range and the fix."""

import dataclasses
import difflib
import math
import pathlib
from typing import Any, Callable

from llama_jax import sharding, xla_flags
from llama_jax.attention import ATTENTION
from llama_jax.data import FORMATS
from llama_jax.model import DTYPES, ROPE_SCALING
from llama_jax.parallel import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class Check:
    ok: Callable[[Any], bool]
    range: str  # the valid values, as the message states them
    fix: str = ""  # what the key means or how to pick a value

    def problem(self, key, value):
        try:
            good = self.ok(value)
        except (TypeError, ValueError):  # a string where a number belongs, and the like
            good = False
        if good:
            return None
        return f"{key}={value!r} is outside its range {self.range}" + (
            f": {self.fix}" if self.fix else "")


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def ints(low, high=None, fix="", none=None):
    """An integer in [low, high]; `none` (its meaning) also allows None."""
    text = f"integer >= {low}" if high is None else f"integer in [{low}, {high}]"
    return Check(lambda x: (none is not None and x is None) or (
        _is_int(x) and x >= low and (high is None or x <= high)),
        text + (f" or None ({none})" if none else ""), fix)


def reals(low=-math.inf, high=math.inf, fix="", low_open=False, high_open=False):
    """A finite number between low and high; *_open excludes that end."""
    text = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, finite"

    def ok(x):
        return (_is_real(x) and (x > low if low_open else x >= low)
                and (x < high if high_open else x <= high))
    return Check(ok, text, fix)


def one_of(choices, fix=""):
    choices = tuple(choices)
    return Check(lambda x: x in choices, f"one of {list(choices)}", fix)


def boolean(fix=""):
    return Check(lambda x: isinstance(x, bool), "True or False", fix)


def text(ok, description, fix=""):
    return Check(lambda x: isinstance(x, str) and ok(x), description, fix)


def profile_range(steps):
    """'10:15' -> (10, 15); anything else -> None."""
    try:
        start, end = (int(x) for x in steps.split(":"))
    except ValueError:
        return None
    return (start, end) if 0 <= start < end else None


def _nonempty(x):
    return bool(x.strip())


def _paths(x):
    items = [x] if isinstance(x, str) else x
    return isinstance(items, (list, tuple)) and bool(items) and all(
        isinstance(p, str) and p.strip() for p in items)


SEED = ints(0, 2**31 - 1, "any seed; the same seed repeats the run")
STEPS_OF = "steps; 0 is not allowed (it would never happen)"

CONFIG = {
    "model.vocab_size": ints(1, fix="rows of the embedding, at least the tokenizer's pieces"),
    "model.dim": ints(1), "model.n_layers": ints(1), "model.n_heads": ints(1),
    "model.n_kv_heads": ints(1, none="same as n_heads", fix="fewer than n_heads is GQA"),
    "model.ffn_dim": ints(1, none="Meta's rounding of 8/3 x dim"),
    "model.multiple_of": ints(1, fix="the ffn_dim rounding when ffn_dim is None"),
    "model.norm_eps": reals(0, 1, low_open=True, fix="LLaMA uses 1e-6, Llama 2 1e-5"),
    "model.rope_theta": reals(0, low_open=True, fix="LLaMA uses 10000"),
    "model.head_dim": Check(lambda x: x is None or (_is_int(x) and x >= 2 and x % 2 == 0),
                            "even integer >= 2 or None (dim / n_heads)",
                            "rotary embeddings turn pairs; Llama 3.2 3B: 128"),
    "model.rope_scaling": one_of(ROPE_SCALING, "llama3 for Llama 3.1/3.2; linear stretches "
                                 "every frequency"),
    "model.rope_scaling_factor": reals(1, fix="how many times the original context; Llama 3.1: "
                                       "8, 3.2: 32"),
    "model.rope_low_freq_factor": reals(0, low_open=True, fix="llama3 scaling; Llama 3.1: 1"),
    "model.rope_high_freq_factor": reals(0, low_open=True, fix="llama3 scaling; Llama 3.1: 4"),
    "model.rope_original_max_seq_len": ints(1, fix="the context before scaling; Llama 3: 8192"),
    "model.tie_embeddings": boolean("the output projection is the input embedding's "
                                    "transpose (Llama 3.2 1B/3B)"),
    "model.max_seq_len": ints(1),
    "model.dtype": one_of(DTYPES), "model.param_dtype": one_of(DTYPES),
    "model.remat": one_of(REMAT_POLICIES), "model.scan_layers": boolean(),
    "model.attention": one_of(ATTENTION, "auto picks the platform's best"),
    # a DCN axis is set by the job's slice count; any ICI axis may take the remaining devices
    **{f"mesh.{axis.name}": ints(1, fix=axis.doc) if axis.network == "dcn" else Check(
        lambda x: _is_int(x) and (x >= 1 or x == -1),
        "integer >= 1, or -1 (the remaining devices; one axis at most)", axis.doc)
       for axis in sharding.AXES},
    "sharding_rules": one_of(sharding.RULES, "presets in llama_jax/sharding.py"),
    "data.sources": Check(lambda x: len(x) > 0, "a non-empty list of source entries",
                          "add e.g. dict(name='code', builtin='code')"),
    "data.validation_fraction": reals(0, 1, low_open=True, high_open=True,
                                      fix="the share of the built-in corpus held out; 0.02"),
    "data.seq_len": ints(1), "data.global_batch_size": ints(1, fix="sequences per step"),
    "data.shuffle_buffer": ints(1, fix="rows; 1 = no shuffling"),
    "data.tokenizer_path": text(lambda x: not x or pathlib.Path(x).is_file(),
                                "'' or an existing tokenizer.model or tokenizer.json file",
                                "'' trains one into the workdir; else fix the path"),
    "data.tokenizer_vocab_size": ints(
        260, fix="SentencePiece needs 256 byte pieces + 3 specials + the corpus's characters"),
    "data.tokenizer_sample_lines": ints(1000, fix="lines the tokenizer trains on"),
    "data.seed": SEED,
    "data.shards": ints(0, fix="0 = one per process"),
    "train.steps": ints(1, fix="the optimizer steps of the whole run"),
    "train.lr": reals(0, 1, low_open=True, fix="the peak learning rate; the paper: 3e-4 / 1.5e-4"),
    "train.warmup_steps": ints(0, fix="0 = no warmup; the paper: 2000"),
    "train.final_lr_fraction": reals(0, 1, fix="the cosine's end as a fraction of lr; 0.1"),
    "train.b1": reals(0, 1, high_open=True, fix="Adam's beta1; the paper: 0.9"),
    "train.b2": reals(0, 1, high_open=True, fix="Adam's beta2; the paper: 0.95"),
    "train.eps": reals(0, 1, low_open=True, fix="Adam's epsilon; 1e-8"),
    "train.weight_decay": reals(0, 10, fix="decoupled decay; the paper: 0.1; 0 = off"),
    "train.grad_clip": reals(0, fix="global-norm clip; 0 = no clipping; the paper: 1.0"),
    "train.loss_chunk_size": ints(0, fix="0 = the whole sequence at once"),
    "train.microbatches": ints(1, fix="1 = no gradient accumulation"),
    "train.seed": SEED,
    "train.log_every": ints(1, fix=STEPS_OF), "train.eval_every": ints(1, fix=STEPS_OF),
    "train.eval_batches": ints(1),
    "train.on_nan": one_of(("abort", "skip")),
    "train.on_spike": one_of(("off", "rewind"), "rewind: back to the last checkpoint, skip data"),
    "train.spike_factor": reals(1, low_open=True,
                                fix="a spike is a loss above this x the running mean"),
    "train.spike_window": ints(2, fix="steps in the running mean"),
    "train.spike_skip_batches": ints(0, fix="batches skipped after the spike's own"),
    "checkpoint.every_steps": ints(1, fix=STEPS_OF), "checkpoint.keep": ints(1),
    "checkpoint.keep_period": ints(0, fix="0 = keep none forever"),
    "profile.steps": text(lambda x: not x or profile_range(x) is not None,
                          "'' or 'START:END' with 0 <= START < END", "e.g. '10:15'"),
    "xla.profile": one_of(xla_flags.CHOICES, "auto: the chips' own profile in "
                          "llama_jax/xla_flags.py; none: no flags"),
    "xla.flags": text(lambda x: xla_flags.parse_flags(x) is not None,
                      "'' or comma-separated xla_NAME=VALUE items",
                      "e.g. 'xla_tpu_enable_async_collective_fusion=false'"),
    "init_from": text(lambda x: not x or pathlib.Path(x, "checkpoints").is_dir(),
                      "'' or a workdir holding checkpoints/", "point it at a run's workdir"),
}

# a data.sources entry's keys (which kind takes which is checked by data/sources.check_entry)
SOURCE = {
    "name": text(_nonempty, "a non-empty string"),
    "weight": reals(0, fix="its share of the mixture (normalized); 0 = unused"),
    "builtin": one_of(("code", "prose"), "stdlib .py files or pydoc topics and docstrings"),
    "files": Check(_paths, "a glob or a non-empty list of globs"),
    "eval_files": Check(_paths, "a glob or a non-empty list of globs"),
    "format": one_of(FORMATS, "text: a document per file; parquet: token stores only"),
    "field": text(_nonempty, "a non-empty string", "the JSON key holding the text"),
    "tfds": text(_nonempty, "a non-empty TFDS name[:version]"),
    "data_dir": Check(lambda x: x is None or isinstance(x, str), "None or a directory"),
    "split": text(_nonempty, "a non-empty split name"),
    "eval_split": text(_nonempty, "a non-empty split name"),
    "store": text(_nonempty, "a non-empty directory",
                  "a token store written by python -m llama_jax.data prepare"),
}

# the entry points' flags, as --name (checked by each tool before it loads anything)
FLAGS = {
    "generate": {
        "temperature": reals(0, fix="0 decodes greedily"),
        "top_p": reals(0, 1, low_open=True, fix="1 = no nucleus cut"),
        "top_k": ints(0, fix="0 = no top-k cut"),
        "max_new_tokens": ints(1),
        "seed": SEED,
    },
    "evaluate": {"batch_size": ints(1), "seq_len": ints(0, fix="0 = the default length"),
                 "max_batches": ints(0, fix="0 = the whole split")},
    "bench": {"steps": ints(0, fix="0 = compile only"),
              "documents": ints(0, fix="0 = no segment ids")},
    "local": {"num_processes": ints(1), "devices_per_process": ints(1),
              "grace_s": reals(0, fix="seconds from SIGTERM to SIGKILL")},
    "plot": {
        "workdir": text(lambda w: pathlib.Path(w, "metrics.jsonl").is_file(),
                        "a directory holding metrics.jsonl",
                        "pass the workdir of a llama_jax.train run (repeat for several)"),
        "out": text(lambda x: pathlib.Path(x).suffix in (".png", ".pdf", ".svg") and
                    pathlib.Path(x).absolute().parent.is_dir(),
                    "a .png, .pdf or .svg path in an existing directory"),
    },
}


def flat(config, prefix=""):
    """{'train.lr': 3e-4, ...} for every leaf key of a ConfigDict (lists stay whole)."""
    out = {}
    for key, value in config.items():
        if hasattr(value, "items") and not isinstance(value, (list, tuple)):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_problems(config):
    """Every range violation of a config and of its data.sources entries, as messages."""
    values = flat(config)
    problems = [f"{key} is not a known setting: remove it or fix its spelling{near(key)}"
                for key in sorted(set(values) - set(CONFIG))]
    problems += [m for key, check in CONFIG.items()
                 if key in values and (m := check.problem(key, values[key]))]
    for index, entry in enumerate(values.get("data.sources") or []):
        entry = dict(entry)
        problems += [m for key, value in entry.items() if key in SOURCE and
                     (m := SOURCE[key].problem(f"data.sources[{index}].{key}", value))]
    return problems


def check_config(config):
    """Raises one ValueError line listing every setting outside its range."""
    problems = config_problems(config)
    if problems:
        raise ValueError("; ".join(problems))


def check_model(cfg):
    """Raises one ValueError line for the fields of a ModelConfig outside their range (the
    config's model.* rows), for one built without a config (ModelConfig.__post_init__)."""
    problems = [m for field in dataclasses.fields(cfg)
                if (check := CONFIG.get(f"model.{field.name}")) and
                (m := check.problem(f"model.{field.name}", getattr(cfg, field.name)))]
    if problems:
        raise ValueError("; ".join(problems))


def check_sources(data_config):
    """Each data.sources entry's kind and keys, and a JSONL source's first line (reads files,
    imports TensorFlow: for the entry points that read data)."""
    from llama_jax.data import sources
    sources.check_names([dict(entry) for entry in data_config.sources])
    for entry in data_config.sources:
        sources.check_entry(dict(entry))
        sources.check_first_document(dict(entry))


def check_flags(tool, values):
    """Raises one ValueError line for the tool's flags (name -> value) outside their range."""
    problems = [m for name, value in values.items()
                if (m := FLAGS[tool][name].problem(f"--{name}", value))]
    if problems:
        raise ValueError("; ".join(problems))


def near(key):
    """' (did you mean train.steps?)' for the keys of the same section spelt alike, or ''."""
    section = key.rpartition(".")[0]
    keys = [k for k in CONFIG if k.rpartition(".")[0] == section]
    # a misspelt section (trian.steps) has no keys of its own: compare with every key
    near = difflib.get_close_matches(key, keys or list(CONFIG), n=2, cutoff=0.8)
    return f" (did you mean {' or '.join(near)}?)" if near else ""
