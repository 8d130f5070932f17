"""Weights in and out: Hugging Face (config.json + safetensors) and Meta (params.json +
consolidated.NN.pth) to our parameter tree, and our parameters back to Hugging Face.

  python -m llama_jax.convert --from=hf --src=HF_DIR --dst=WORKDIR
  python -m llama_jax.convert --from=meta --src=META_DIR --dst=WORKDIR
  python -m llama_jax.convert --to=hf --src=WORKDIR --dst=HF_DIR [--config=configs/x.py]

--from writes a params-only workdir (checkpoint.save_params: model.json, the source's
tokenizer.model or tokenizer.json when it has one, checkpoints/0) that generate and evaluate
read and that a training run starts from with --config.init_from=WORKDIR. --to reads a
training or converted workdir's model.json and latest params; --config is needed only for a
workdir without model.json.
Our RoPE is Hugging Face's rotate-half layout, so HF weights map by transposes and reshapes only;
Meta's q/k rows are permuted once, in meta_to_rotate_half.
"""

import dataclasses
import json
import pathlib
import re
import sys

from absl import app, flags

from llama_jax import cli


def define_flags():
    """Defined only when run as a program, so importing this module never clashes with the
    flags of other entry points in the same process (tests import several)."""
    flags.DEFINE_enum("from", None, ["hf", "meta"], "Convert from this format into a workdir.")
    flags.DEFINE_enum("to", None, ["hf"], "Convert a workdir's latest checkpoint to this format.")
    flags.DEFINE_string("src", None, "Source directory (HF or Meta model, or a workdir).")
    flags.DEFINE_string("dst", None, "Destination directory (a workdir, or an HF model).")
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "With --to: the config the workdir was "
                                    "trained with; needed only without model.json.")


if __name__ == "__main__":  # --help and flag or config errors answer before JAX loads
    define_flags()
    cli.parse_flags()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from llama_jax import checkpoint  # noqa: E402
from llama_jax.attention import resolve_attention  # noqa: E402
from llama_jax.data.tokenizer import (BOS_ID, EOS_ID, install, load_tokenizer,  # noqa: E402
                                      tokenizer_file)
from llama_jax.model import DTYPES, ModelConfig  # noqa: E402


def _torch():
    """torch reads Meta's .pth files only, so it stays an optional extra."""
    try:
        import torch
    except ImportError:
        raise ImportError("torch is needed to convert a Meta checkpoint: pip install "
                          "'llama_jax[meta]'") from None
    return torch


# ---------------------------------------------------------------- the layer-by-layer mapping

def _layer_from_linears(t, cfg):
    """PyTorch [out, in] matrices of one layer (our names) -> our per-layer parameter dict."""
    d, h, k, e = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return {
        "attention": {"wq": t["wq"].T.reshape(d, h, e), "wk": t["wk"].T.reshape(d, k, e),
                      "wv": t["wv"].T.reshape(d, k, e), "wo": t["wo"].T.reshape(h, e, d)},
        "attention_norm": {"scale": t["attention_norm"]},
        "feed_forward": {"w1": t["w1"].T, "w2": t["w2"].T, "w3": t["w3"].T},
        "ffn_norm": {"scale": t["ffn_norm"]},
    }


def _layer_to_linears(p, cfg):
    """Inverse of _layer_from_linears."""
    d, h, k, e = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    a, f = p["attention"], p["feed_forward"]
    return {"wq": a["wq"].reshape(d, h * e).T, "wk": a["wk"].reshape(d, k * e).T,
            "wv": a["wv"].reshape(d, k * e).T, "wo": a["wo"].reshape(h * e, d).T,
            "w1": f["w1"].T, "w2": f["w2"].T, "w3": f["w3"].T,
            "attention_norm": p["attention_norm"]["scale"], "ffn_norm": p["ffn_norm"]["scale"]}


def _linear_shapes(cfg):
    """PyTorch [out, in] shape of each per-layer tensor, by our name."""
    d, f = cfg.dim, cfg.ffn_dim
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q), "w1": (f, d),
            "w3": (f, d), "w2": (d, f), "attention_norm": (d,), "ffn_norm": (d,)}


def _assemble(cfg, embed, norm, output, layers):
    """Our tree from per-layer dicts: stacked on axis 0 under "layers" when cfg.scan_layers;
    output is None for tied embeddings (the tree then has no "output")."""
    params = {"tok_embeddings": embed, "norm": {"scale": norm}}
    if not cfg.tie_embeddings:
        params["output"] = output
    if cfg.scan_layers:
        params["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    return params


def _layers(params, cfg):
    """Per-layer dicts from either tree layout."""
    if "layers" in params:
        return [jax.tree.map(lambda x: x[i], params["layers"]) for i in range(cfg.n_layers)]
    return [params[f"layers_{i}"] for i in range(cfg.n_layers)]


# ------------------------------------------------------------------------------ Hugging Face

HF_LAYER = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
            "wo": "self_attn.o_proj", "w1": "mlp.gate_proj", "w3": "mlp.up_proj",
            "w2": "mlp.down_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}


def config_from_hf(hf: dict) -> ModelConfig:
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch != "LlamaForCausalLM" or hf.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json describes {arch} (model_type {hf.get('model_type')!r}): "
                         "only LlamaForCausalLM checkpoints can be converted")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("config.json asks for a non-silu activation or biases, which LLaMA "
                         "does not have: convert a plain Llama checkpoint")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn_dim=hf["intermediate_size"], norm_eps=hf["rms_norm_eps"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings", 2048), dtype="float32",
        param_dtype="float32", **_rope_from_hf(hf))


def _rope_from_hf(hf: dict) -> dict:
    """ModelConfig's rope fields from config.json: transformers 5 nests them all in
    rope_parameters; 4.x kept rope_theta flat beside rope_scaling (null when unscaled)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    fields = {"rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0))}
    if kind == "linear":
        fields.update(rope_scaling="linear", rope_scaling_factor=rope["factor"])
    elif kind == "llama3":
        fields.update(rope_scaling="llama3", rope_scaling_factor=rope["factor"],
                      rope_low_freq_factor=rope["low_freq_factor"],
                      rope_high_freq_factor=rope["high_freq_factor"],
                      rope_original_max_seq_len=rope["original_max_position_embeddings"])
    elif kind != "default":
        raise ValueError(f"rope type {kind!r} is not supported: model.rope implements "
                         "'default', 'linear' and 'llama3'")
    return fields


def _rope_to_hf(cfg: ModelConfig) -> dict:
    """The inverse of _rope_from_hf, in both layouts, so transformers 4.x and 5 read it."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                    low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_seq_len)
    legacy = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {"rope_theta": cfg.rope_theta, "rope_parameters": rope,
            "rope_scaling": legacy if cfg.rope_scaling != "none" else None}


def config_to_hf(cfg: ModelConfig, dtype="float32", special_ids=(BOS_ID, EOS_ID)) -> dict:
    """transformers' config.json; special_ids are the tokenizer's (BOS, EOS): Llama 3's are
    128000 / 128001, not SentencePiece's 1 / 2."""
    bos, eos = special_ids
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        **_rope_to_hf(cfg), "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos, "eos_token_id": eos,
        "dtype": dtype,
    }


def _read_safetensors(src):
    """All tensors of a HF directory, single-file or sharded (model.safetensors.index.json)."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{src} has neither model.safetensors nor "
                                "model.safetensors.index.json: save the model with "
                                "save_pretrained(..., safe_serialization=True)")
    tensors = {}
    for name in files:
        if not (src / name).exists():
            raise FileNotFoundError(f"shard {src / name} named in the index is missing: "
                                    "download every model-*.safetensors file")
        tensors.update(load_file(src / name))
    return tensors


def _check_shape(name, array, shape):
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"tensor {name} has shape {tuple(array.shape)} but the config implies "
                         f"{tuple(shape)}: config.json and the weights disagree")


def load_hf(src):
    """HF_DIR -> (ModelConfig, params) in our layout, keeping the stored dtype."""
    src = pathlib.Path(src)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src / 'config.json'} is missing: point --src at a Hugging "
                                "Face model directory")
    hf = json.loads((src / "config.json").read_text())
    cfg = config_from_hf(hf)
    tensors = _read_safetensors(src)
    used = set()

    def take(name, shape):
        if name not in tensors:
            raise KeyError(f"tensor {name} is missing from {src}: the checkpoint is incomplete "
                           "or not a Llama model")
        used.add(name)
        _check_shape(name, tensors[name], shape)
        return tensors[name]

    shapes = _linear_shapes(cfg)
    layers = [_layer_from_linears({ours: take(f"model.layers.{i}.{theirs}.weight", shapes[ours])
                                   for ours, theirs in HF_LAYER.items()}, cfg)
              for i in range(cfg.n_layers)]
    d = cfg.dim
    embed = take("model.embed_tokens.weight", (cfg.vocab_size, d))
    if embed.dtype.name not in DTYPES:
        raise ValueError(f"weights are {embed.dtype.name}: only {sorted(DTYPES)} are supported")
    # compute in the stored precision, so a bfloat16 checkpoint runs as it was released
    cfg = dataclasses.replace(cfg, dtype=embed.dtype.name, param_dtype=embed.dtype.name)
    if cfg.tie_embeddings:  # transformers ties over a stored lm_head too, so it is unused
        used.add("lm_head.weight")
        output = None
    else:
        output = take("lm_head.weight", (cfg.vocab_size, d)).T
    params = _assemble(cfg, embed, take("model.norm.weight", (d,)), output, layers)
    unknown = sorted(n for n in set(tensors) - used if "rotary_emb" not in n)
    if unknown:
        raise ValueError(f"unexpected tensors {unknown[:3]} in {src}: not a plain Llama model")
    return cfg, params


def load_hf_model(src):
    """load_hf for inference, shaped like checkpoint.load_model: (ModelConfig with attention
    resolved for this backend, params, the tokenizer path beside the weights)."""
    cfg, params = load_hf(src)
    return resolve_attention(cfg, jax.default_backend()), params, tokenizer_file(src)


def save_hf(cfg: ModelConfig, params, dst, special_ids=(BOS_ID, EOS_ID)):
    """Writes config.json + model.safetensors that transformers' LlamaForCausalLM loads; a
    tied model (cfg.tie_embeddings) has no lm_head tensor. special_ids: the tokenizer's
    (BOS, EOS), for config.json."""
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(np.asarray, params)
    tensors = {"model.embed_tokens.weight": params["tok_embeddings"],
               "model.norm.weight": params["norm"]["scale"]}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = params["output"].T
    for i, layer in enumerate(_layers(params, cfg)):
        for ours, array in _layer_to_linears(layer, cfg).items():
            tensors[f"model.layers.{i}.{HF_LAYER[ours]}.weight"] = array
    # "pt" metadata: transformers refuses safetensors files without it
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              dst / "model.safetensors", metadata={"format": "pt"})
    dtype = params["tok_embeddings"].dtype.name  # what was written, whatever cfg says
    (dst / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype, special_ids),
                                                indent=2))


def export_hf(workdir, dst, config=None):
    """A workdir out to a Hugging Face directory: the weights, a config.json with the
    tokenizer's own BOS/EOS ids, and the tokenizer (convert --to=hf)."""
    cfg, params, tok = checkpoint.load_model(workdir, config)
    special = (BOS_ID, EOS_ID)
    if tok.exists():
        loaded = load_tokenizer(tok, cfg.vocab_size)
        special = (loaded.bos_id(), loaded.eos_id())
    save_hf(cfg, params, dst, special)
    if tok.exists():
        install(tok, dst)


# ------------------------------------------------------------------------------------- Meta

def meta_to_rotate_half(w, n_heads):
    """Meta q/k rows [N*E, D] -> the rotate-half order that model.rope (and HF) uses.

    Meta's RoPE rotates interleaved pairs (x0, x1), (x2, x3), ...; rotate-half rotates
    (x_i, x_{i+E/2}). Within each head, row 2i+j moves to row j*E/2 + i, so pair i lands on
    positions (i, i+E/2). Applied once on the way in; everything after sees one layout.
    """
    rows, d = w.shape
    e = rows // n_heads
    return w.reshape(n_heads, e // 2, 2, d).swapaxes(1, 2).reshape(rows, d)


# Meta's model-parallel layout: the dimension each sharded tensor was split along (None: copied).
META_SPLIT = {"tok_embeddings": 1, "output": 0, "norm": None, "wq": 0, "wk": 0, "wv": 0,
              "wo": 1, "w1": 0, "w3": 0, "w2": 1, "attention_norm": None, "ffn_norm": None}


def _read_meta_shards(src):
    torch = _torch()
    files = sorted(src.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"no consolidated.NN.pth under {src}: point --src at a Meta "
                                "checkpoint directory")
    numbers = [int(re.fullmatch(r"consolidated\.(\d+)\.pth", p.name).group(1)) for p in files]
    if numbers != list(range(len(files))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        raise FileNotFoundError(f"{src} is missing model-parallel shard(s) "
                                f"{['consolidated.%02d.pth' % n for n in missing]}: download "
                                "every shard")
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in files]
    merged = {}
    for name in shards[0]:
        if name.endswith("rope.freqs"):
            continue
        kind = name.split(".")[-2]
        parts = [s[name].float().numpy() if s[name].dtype == torch.bfloat16
                 else s[name].numpy() for s in shards]
        axis = META_SPLIT.get(kind, "unknown")
        if axis == "unknown":
            raise ValueError(f"unexpected tensor {name} in {src}: not a LLaMA checkpoint")
        merged[name] = parts[0] if axis is None or len(parts) == 1 else np.concatenate(parts, axis)
    return merged


def load_meta(src):
    """META_DIR (params.json + consolidated.NN.pth) -> (ModelConfig, params), float32."""
    src = pathlib.Path(src)
    if not (src / "params.json").exists():
        raise FileNotFoundError(f"{src / 'params.json'} is missing: point --src at a Meta "
                                "checkpoint directory")
    meta = json.loads((src / "params.json").read_text())
    if meta.get("use_scaled_rope"):
        raise ValueError(f"{src / 'params.json'} asks for Llama 3.1+ scaled RoPE, whose factor "
                         "Meta's params.json does not record: convert the Hugging Face release "
                         "(--from=hf; its config.json names the scaling)")
    t = _read_meta_shards(src)

    def take(name):
        if name not in t:
            raise KeyError(f"tensor {name} is missing from {src}: the checkpoint is incomplete")
        return t[name]

    embed = take("tok_embeddings.weight")
    ffn_dim = take("layers.0.feed_forward.w1.weight").shape[0]  # covers ffn_dim_multiplier too
    cfg = ModelConfig(vocab_size=embed.shape[0], dim=meta["dim"], n_layers=meta["n_layers"],
                      n_heads=meta["n_heads"], n_kv_heads=meta.get("n_kv_heads"),
                      ffn_dim=ffn_dim, norm_eps=meta.get("norm_eps", 1e-6),
                      rope_theta=meta.get("rope_theta", 10000.0), dtype="float32")
    shapes = _linear_shapes(cfg)
    layers = []
    for i in range(cfg.n_layers):
        raw = {}
        for ours, shape in shapes.items():
            group = "attention" if ours in ("wq", "wk", "wv", "wo") else "feed_forward"
            name = (f"layers.{i}.{ours}.weight" if ours.endswith("norm")
                    else f"layers.{i}.{group}.{ours}.weight")
            raw[ours] = take(name)
            _check_shape(name, raw[ours], shape)  # a short merge means a missing shard
        raw["wq"] = meta_to_rotate_half(raw["wq"], cfg.n_heads)
        raw["wk"] = meta_to_rotate_half(raw["wk"], cfg.n_kv_heads)
        layers.append(_layer_from_linears(raw, cfg))
    d = cfg.dim
    _check_shape("tok_embeddings.weight", embed, (cfg.vocab_size, d))
    output = take("output.weight")
    _check_shape("output.weight", output, (cfg.vocab_size, d))
    return cfg, _assemble(cfg, embed, take("norm.weight"), output.T, layers)


# -------------------------------------------------------------------------------------- CLI

def main(argv):
    fl = flags.FLAGS
    source = fl["from"].value
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if (source is None) == (fl.to is None) or not fl.src or not fl.dst:
        raise app.UsageError("give exactly one of --from=hf|meta or --to=hf, plus --src and "
                             "--dst, e.g. --from=hf --src=hf_model --dst=runs/converted")
    src = pathlib.Path(fl.src)
    # an HF export writes config.json and safetensors over whatever is there: never a workdir
    workdir_files = [name for name in ("checkpoints", "model.json", "metrics.jsonl")
                     if fl.to == "hf" and (pathlib.Path(fl.dst) / name).exists()]
    if workdir_files:
        sys.exit(f"error: --dst={fl.dst} is a training or converted workdir (it holds "
                 f"{workdir_files[0]}): pass a new or empty directory for the HF model")
    try:
        if fl.to == "hf":
            export_hf(src, fl.dst, fl.config)
        else:
            cfg, params = load_hf(src) if source == "hf" else load_meta(src)
            tok = tokenizer_file(src)
            checkpoint.save_params(fl.dst, cfg, params, tok if tok.exists() else None)
    except (ValueError, KeyError, OSError, ImportError) as e:
        # a known failure is one line that says the fix, not a traceback wall
        sys.exit(f"error: {e}")
    print(f"wrote {fl.dst}")


if __name__ == "__main__":
    cli.run(main)
