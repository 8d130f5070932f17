"""Shared config defaults (the LLaMA recipe) and the checks that turn a loose ConfigDict into
validated settings. Config files in configs/ call `base_config()` and change what differs."""

import dataclasses
import importlib.util
import pathlib

import ml_collections

from llama_jax import sharding
from llama_jax.attention import resolve_attention
from llama_jax.model import ModelConfig


def base_config(**model) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # ModelConfig's own defaults (one source), with LLaMA-7B's sizes for the fields it requires.
    # A None default (n_kv_heads, head_dim, ffn_dim: derived from the others) is an int
    # placeholder, still None, so that --config.model.n_kv_heads=8 can override it
    c.model = ml_collections.ConfigDict({
        "vocab_size": 32000, "dim": 4096, "n_layers": 32, "n_heads": 32,
        **{f.name: ml_collections.config_dict.placeholder(int) if f.default is None
           else f.default for f in dataclasses.fields(ModelConfig)
           if f.default is not dataclasses.MISSING}})
    c.model.update(model)
    # one -1 axis fills the remaining devices; slices: TPU slices joined by the data-center
    # network, data-parallel across them (docs/distributed.md, "Several slices")
    c.mesh = ml_collections.ConfigDict(sharding.DEFAULT_MESH)  # sharding.AXES, in table order
    c.sharding_rules = sharding.DEFAULT_RULES  # a preset in llama_jax/sharding.py RULES

    c.data = ml_collections.ConfigDict(dict(
        # a weighted mixture: each entry is {name, weight} plus builtin= / files= / tfds= (see
        # llama_jax/data/sources.py); the built-in code corpus is always present offline
        sources=[dict(name="stdlib_code", weight=1.0, builtin="code")],
        validation_fraction=0.02,
        seq_len=2048,
        global_batch_size=2048,  # sequences; 2048 x 2048 = the paper's 4M tokens per batch
        shuffle_buffer=1024,
        tokenizer_path="",  # a trained .model (python -m llama_jax.data.tokenizer train); "" = below
        tokenizer_vocab_size=32000,  # SentencePiece BPE trained on first use, cached in workdir
        tokenizer_sample_lines=2_000_000,
        seed=0,
        # data-iterator shards, each read by one process (0: one per process). A fixed value
        # that every process count you use divides lets a run resume its data stream exactly
        # after changing the process count
        shards=0,
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=250_000,  # 1T tokens at 4M tokens a step
        lr=3.0e-4, warmup_steps=2000, final_lr_fraction=0.1,
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
        grad_clip=1.0,  # the global-norm bound; 0 = no clipping at all
        loss_chunk_size=0,  # sequence positions per output-projection chunk; 0 = whole sequence
        # gradient accumulation: the global batch is run as this many microbatches, one at a
        # time, then one optimizer update; activation memory is one microbatch's
        microbatches=1,
        seed=0, log_every=10, eval_every=1000, eval_batches=8,
        on_nan="abort",  # or "skip": drop the non-finite update and go on
        # "rewind": a loss above spike_factor x the mean of the last spike_window steps goes
        # back to the last checkpoint and skips the batches from there to the spike, plus
        # spike_skip_batches more (docs/training.md#loss-spikes); "off": no detection
        on_spike="off", spike_factor=3.0, spike_window=20, spike_skip_batches=0,
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=1000,  # also saved at the end and on SIGTERM
        keep=3,  # the newest N
        keep_period=0,  # and, when > 0, every step divisible by it, forever
    ))
    c.profile = ml_collections.ConfigDict(dict(
        steps="",  # "START:END" captures a JAX profiler trace into WORKDIR/tensorboard
    ))
    # compiler flags (llama_jax/xla_flags.py): "auto" = the profile of the chips the step runs
    # on (none on a CPU), "none", or a profile's name; flags: "xla_NAME=VALUE,..." over it
    c.xla = ml_collections.ConfigDict(dict(profile="auto", flags=""))
    c.init_from = ""  # another run's workdir: start from its params (fresh optimizer and step)
    c.lock()  # a misspelt key in a config file fails as it does on the command line
    return c


def llama2_config(lr, **model) -> ml_collections.ConfigDict:
    """Llama 2 (arXiv 2307.09288): RMSNorm eps 1e-5, a 4,096 context, 4M-token batches of
    4,096-token rows, AdamW eps 1e-5, 2T tokens, peak `lr` (3e-4 for 7B/13B, 1.5e-4 for 70B)."""
    c = base_config(**{"norm_eps": 1e-5, "max_seq_len": 4096, **model})
    c.data.seq_len = 4096
    c.data.global_batch_size = 1024  # x 4096 = 4M tokens a step
    c.train.update(lr=lr, eps=1e-5, steps=476837)  # 2T tokens / 4M tokens a step
    return c


def llama3_config(**model) -> ml_collections.ConfigDict:
    """Llama 3.1 / 3.2: the 128,256-piece BPE vocabulary, RoPE theta 500,000 with "llama3"
    scaling from an 8,192 to a 131,072 context (factor 8 in 3.1; the 3.2 configs pass 32),
    RMSNorm eps 1e-5. Meta published no schedule at these sizes, so training is continued
    pretraining: 4M-token batches of 8,192-token rows, lr 3e-5 (a tenth of Llama 2's peak),
    200 warmup steps, cosine to 10% over 10B tokens."""
    c = base_config(**{
        "vocab_size": 128256, "norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": "llama3", "rope_scaling_factor": 8.0, "rope_low_freq_factor": 1.0,
        "rope_high_freq_factor": 4.0, "rope_original_max_seq_len": 8192,
        "max_seq_len": 131072, **model})
    c.data.seq_len = 8192
    c.data.global_batch_size = 512  # x 8192 = 4M tokens a step
    c.train.update(lr=3e-5, warmup_steps=200, steps=2384)  # 10B tokens / 4M tokens a step
    return c


def load_config(path) -> ml_collections.ConfigDict:
    """get_config() of a configs/*.py file, for code that takes a path rather than --config."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found: pass a configs/*.py path "
                                "(relative paths start at the current directory)")
    spec = importlib.util.spec_from_file_location(f"llama_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def model_from_fields(fields, source, fix) -> ModelConfig:
    """The one way a dict becomes a ModelConfig (a config's model section, a workdir's
    model.json): a key that is no field is an error naming `source` and `fix`."""
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"{source} has unknown keys {unknown}: {fix}")
    return ModelConfig(**fields)


def model_config(config) -> ModelConfig:
    """The typed ModelConfig of a loose config (attention="auto" still unresolved: validate
    resolves it for the mesh)."""
    return model_from_fields(config.model.to_dict(), "config.model", "remove them or fix their "
                             "spelling (see llama_jax/model.py ModelConfig)")


def validate(config, mesh):
    """One-line errors for settings that would otherwise fail deep inside XLA or silently;
    returns the ModelConfig resolved for the mesh's platform. Each key's own range is ranges.py's
    (check_config, which every entry point runs first, before its mesh); here are the facts
    that relate keys to each other and to the mesh."""
    data, train = config.data, config.train
    sizes = dict(mesh.shape)
    context = sharding.size_of(sizes, sharding.CONTEXT)
    cfg = resolve_attention(model_config(config), mesh.devices.flat[0].platform, data.seq_len,
                            context)
    errors = []
    heads = sharding.size_of(sizes, sharding.weight_axes("heads"))
    if cfg.n_heads % heads or cfg.n_kv_heads % heads:
        names = "*".join(sharding.weight_axes("heads"))
        errors.append(f"model.n_heads={cfg.n_heads} / n_kv_heads={cfg.n_kv_heads} are not "
                      f"divisible by mesh.{names}={heads}: pick a {names} size dividing both")
    shards = sharding.size_of(sizes, sharding.BATCH)
    batch_axes = "*".join(sharding.BATCH)
    if data.global_batch_size % shards:
        errors.append(f"data.global_batch_size={data.global_batch_size} is not divisible by "
                      f"mesh {batch_axes}={shards}: make it a multiple of {shards}")
    micro = train.microbatches
    if data.global_batch_size % shards == 0 and data.global_batch_size % (micro * shards):
        # each microbatch is split over all the batch axes' devices: it must divide evenly too
        errors.append(f"data.global_batch_size={data.global_batch_size} is not divisible by "
                      f"train.microbatches={micro} x mesh {batch_axes}={shards}: make it a "
                      f"multiple of {micro * shards} or change train.microbatches")
    if data.seq_len > cfg.max_seq_len:
        errors.append(f"data.seq_len={data.seq_len} exceeds model.max_seq_len="
                      f"{cfg.max_seq_len}: lower seq_len or raise max_seq_len")
    if train.warmup_steps >= train.steps:
        errors.append(f"train.warmup_steps={train.warmup_steps} is not shorter than train.steps="
                      f"{train.steps}: lower warmup_steps")
    if cfg.attention == "splash" and data.seq_len % (128 * context):
        # each device's queries (seq_len / context) fill whole blocks
        errors.append(f"data.seq_len={data.seq_len} is not a multiple of " + (
            f"128 x mesh.{sharding.CONTEXT}={128 * context}" if context > 1 else "128") +
            ", which splash attention's blocks need: pick such a seq_len or "
            "model.attention='xla'")
    if train.loss_chunk_size and data.seq_len % (train.loss_chunk_size * context):
        errors.append(f"train.loss_chunk_size={train.loss_chunk_size} does not divide "
                      f"data.seq_len={data.seq_len}" + (
                          f" / mesh.{sharding.CONTEXT}={context}" if context > 1 else ""))
    if context > 1 and data.seq_len % (2 * context):
        # parallel.balance pairs chunk i with chunk 2*context-1-i of 2*context equal chunks
        errors.append(f"data.seq_len={data.seq_len} is not a multiple of 2 x mesh."
                      f"{sharding.CONTEXT}={2 * context}: make seq_len a multiple of "
                      f"{2 * context} or change mesh.{sharding.CONTEXT}")
    if context > 1 and cfg.attention == "cudnn":
        errors.append(f"model.attention={cfg.attention!r} does not run with mesh."
                      f"{sharding.CONTEXT}={context} (its kernel sees whole sequences): set "
                      f"model.attention='xla' or mesh.{sharding.CONTEXT}=1")
    if errors:
        raise ValueError("; ".join(errors))
    return cfg
