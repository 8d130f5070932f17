"""Conversion parity against transformers' LlamaForCausalLM on random-weight tiny models."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import ROOT
from llama_jax import checkpoint, convert
from llama_jax.model import Llama

# (vocab, dim, layers, heads, kv heads, ffn, tied, rope parameters[, head_dim]): odd sizes, and
# scaling whose original context (32) the parity tokens (80 positions) run past. With head dim
# 16 and theta 1e4 the wavelengths 6.3, 20, 63, ... put one frequency in each llama3 regime
# (kept below 32/4, blended between, divided by the factor above 32).
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
SHAPES = {
    "mha": (101, 32, 2, 4, 4, 64, False, {"rope_type": "default", "rope_theta": 10000.0}),
    "gqa_odd_vocab": (257, 48, 3, 6, 2, 80, False,
                      {"rope_type": "default", "rope_theta": 500000.0}),
    "mqa_tied": (67, 32, 2, 4, 1, 48, True, {"rope_type": "default", "rope_theta": 10000.0}),
    # Llama 3.1-like: GQA + llama3 scaling, and heads x head_dim (96) wider than dim (48)
    "llama3_gqa_wide_heads": (131, 48, 2, 6, 2, 72, False, LLAMA3, 16),
    # Llama 3.2-like: tied embeddings + llama3 scaling with factor 32
    "llama3_tied": (97, 64, 2, 4, 2, 96, True, dict(LLAMA3, factor=32.0)),
    "linear_scaling": (53, 32, 2, 2, 1, 40, False,
                       {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
}


def hf_model(name, seed=0):
    vocab, dim, layers, heads, kv, ffn, tied, rope, *head_dim = SHAPES[name]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv,
                         intermediate_size=ffn, tie_word_embeddings=tied, rms_norm_eps=1e-5,
                         rope_parameters=dict(rope), max_position_embeddings=128,
                         head_dim=head_dim[0] if head_dim else dim // heads)
    model = LlamaForCausalLM(config).eval()
    # HF's init (std 0.02, norms 1) gives logits near 0 where any error looks small, and
    # norms of 1 would hide a swapped norm: logits here span a few units
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0.0, 0.1)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


def our_logits(cfg, params, tokens):
    return np.asarray(Llama(cfg).apply({"params": params}, tokens))


def tokens_for(model, seed=1, shape=(2, 80)):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, shape).astype(np.int32)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_hf_logits_match_and_round_trip_is_bit_exact(name, tmp_path):
    model = hf_model(name)
    # the sharded layout (index + several files) is the one big checkpoints use
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if name == "mha" else "1GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == (name == "mha")

    cfg, params = convert.load_hf(tmp_path / "hf")
    assert cfg.rope_scaling == {"default": "none"}.get(SHAPES[name][7]["rope_type"],
                                                       SHAPES[name][7]["rope_type"])
    assert ("output" in params) == (not cfg.tie_embeddings) == (not SHAPES[name][6])
    tokens = tokens_for(model)
    expected = hf_logits(model, tokens)
    diff = np.abs(our_logits(cfg, params, tokens) - expected).max()
    print(f"{name}: max-abs logit diff {diff:.2e} (logit std {expected.std():.2f})")
    assert expected.std() > 0.3
    assert diff <= 1e-5
    if cfg.rope_scaling != "none":  # the scaling is what makes the positions past 32 agree
        plain = dataclasses.replace(cfg, rope_scaling="none")
        assert np.abs(our_logits(plain, params, tokens) - expected)[:, 32:].max() > 1e-2

    convert.save_hf(cfg, params, tmp_path / "back")
    original = model.state_dict()
    written = load_file(tmp_path / "back" / "model.safetensors")
    expected = {k for k in original if not (SHAPES[name][6] and k == "lm_head.weight")}
    assert set(written) == expected
    for key, array in written.items():
        assert np.array_equal(array, original[key].numpy()), key
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))
    assert convert.config_from_hf(json.loads((tmp_path / "back" / "config.json").read_text())) \
        == cfg  # every field, rope scaling and tying included, survives the trip


def test_unstacked_layers_convert_too(tmp_path):
    model = hf_model("gqa_odd_vocab")
    model.save_pretrained(tmp_path / "hf")
    cfg, params = convert.load_hf(tmp_path / "hf")
    flat_cfg = dataclasses.replace(cfg, scan_layers=False)
    flat = convert._assemble(flat_cfg, params["tok_embeddings"], params["norm"]["scale"],
                             params["output"], convert._layers(params, cfg))
    tokens = tokens_for(model)
    np.testing.assert_allclose(our_logits(flat_cfg, flat, tokens), hf_logits(model, tokens),
                               atol=1e-5, rtol=0)


def to_meta(model):
    """HF state dict -> Meta tensor names, q/k rows put back in interleaved-pair order."""
    c = model.config
    sd = {k: v.clone() for k, v in model.state_dict().items()}

    def interleave(w, n_heads):  # the inverse of convert.meta_to_rotate_half
        rows, d = w.shape
        return w.reshape(n_heads, 2, rows // n_heads // 2, d).transpose(1, 2).reshape(rows, d)

    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
            "norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        meta.update({
            f"layers.{i}.attention.wq.weight": interleave(sd[p + "self_attn.q_proj.weight"],
                                                          c.num_attention_heads),
            f"layers.{i}.attention.wk.weight": interleave(sd[p + "self_attn.k_proj.weight"],
                                                          c.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        })
    return meta


def write_meta(model, path, n_shards):
    """A fake Meta checkpoint split into model-parallel shards as Meta's code splits it."""
    c = model.config
    path.mkdir()
    (path / "params.json").write_text(json.dumps(dict(
        dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads, multiple_of=16, norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_parameters["rope_theta"], vocab_size=-1)))
    meta = to_meta(model)
    for s in range(n_shards):
        shard = {}
        for name, w in meta.items():
            axis = convert.META_SPLIT[name.split(".")[-2]]
            shard[name] = w if axis is None else w.chunk(n_shards, dim=axis)[s].clone()
        torch.save(shard, path / f"consolidated.{s:02d}.pth")


@pytest.mark.parametrize("name", ["mha", "gqa_odd_vocab"])
def test_meta_shards_match_hf_logits(name, tmp_path):
    model = hf_model(name, seed=3)
    write_meta(model, tmp_path / "meta", n_shards=2)
    cfg, params = convert.load_meta(tmp_path / "meta")
    tokens = tokens_for(model)
    diff = np.abs(our_logits(cfg, params, tokens) - hf_logits(model, tokens)).max()
    print(f"meta {name}: max-abs logit diff {diff:.2e}")
    assert diff <= 1e-5
    # the same weights via HF's own layout agree exactly, so the permutation is the only change
    model.save_pretrained(tmp_path / "hf")
    _, hf_params = convert.load_hf(tmp_path / "hf")
    assert all(np.array_equal(a, b) for a, b in zip(
        convert.jax.tree.leaves(params), convert.jax.tree.leaves(hf_params)))


def test_meta_missing_shard_is_named(tmp_path):
    write_meta(hf_model("mha"), tmp_path / "meta", n_shards=2)
    (tmp_path / "meta" / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match="consolidated.00.pth"):
        convert.load_meta(tmp_path / "meta")


def test_cli_hf_to_workdir_and_back(tmp_path):
    model = hf_model("gqa_odd_vocab")
    model.save_pretrained(tmp_path / "hf")
    run = [sys.executable, "-m", "llama_jax.convert"]
    env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    subprocess.run(run + ["--from=hf", f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'wd'}"],
                   check=True, env=env, capture_output=True)
    cfg = checkpoint.read_model(tmp_path / "wd")
    assert (cfg.vocab_size, cfg.n_kv_heads, cfg.rope_theta) == (257, 2, 500000.0)
    subprocess.run(run + ["--to=hf", f"--src={tmp_path / 'wd'}", f"--dst={tmp_path / 'back'}"],
                   check=True, env=env, capture_output=True)
    back = load_file(tmp_path / "back" / "model.safetensors")
    for key, array in model.state_dict().items():
        assert np.array_equal(back[key], array.numpy()), key


@pytest.mark.parametrize("edit, error, match", [
    (lambda c: c.update(architectures=["MistralForCausalLM"]), ValueError, "LlamaForCausalLM"),
    (lambda c: c.update(intermediate_size=65), ValueError, "gate_proj"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
     ValueError, "rope type 'yarn' is not supported"),
])
def test_bad_hf_input_is_a_clear_error(edit, error, match, tmp_path):
    hf_model("mha").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=match):
        convert.load_hf(tmp_path)


def test_missing_hf_tensor_is_named(tmp_path):
    from safetensors.numpy import save_file
    hf_model("mha").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        convert.load_hf(tmp_path)


def test_a_hugging_face_directory_loads_for_inference(tmp_path):
    model = hf_model("mqa_tied")
    model.save_pretrained(tmp_path / "hf")
    cfg, params, tokenizer_path = convert.load_hf_model(tmp_path / "hf")
    assert tokenizer_path == tmp_path / "hf" / "tokenizer.model"
    assert cfg.attention == "xla"  # "auto" resolved for this (CPU) backend
    tokens = tokens_for(model)
    np.testing.assert_allclose(our_logits(cfg, params, tokens), hf_logits(model, tokens),
                               atol=1e-5, rtol=0)


def test_bfloat16_checkpoints_stay_bfloat16_bit_exactly(tmp_path):
    model = hf_model("gqa_odd_vocab").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = convert.load_hf(tmp_path / "hf")
    assert (cfg.dtype, cfg.param_dtype, params["output"].dtype.name) == ("bfloat16",) * 3
    convert.save_hf(cfg, params, tmp_path / "back")
    written = load_file(tmp_path / "back" / "model.safetensors")
    for key, tensor in model.state_dict().items():
        assert np.array_equal(written[key].view(np.int16), tensor.view(torch.int16).numpy()), key


def test_a_converted_workdir_starts_a_training_run_via_init_from(tmp_path):
    from helpers import micro_config
    from llama_jax import sharding, train_step
    config = micro_config()  # V=512 D=64 L=2 H=4 K=2 F=128, as the HF model below
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, rms_norm_eps=1e-6,
        tie_word_embeddings=False)).eval()
    model.save_pretrained(tmp_path / "hf")
    cfg, params = convert.load_hf(tmp_path / "hf")
    checkpoint.save_params(tmp_path / "wd", cfg, params)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config.sharding_rules = "fsdp_tp"
    abstract = train_step.build(config, mesh).abstract
    restored = checkpoint.restore_params(tmp_path / "wd", abstract)
    assert restored["output"].sharding.spec == abstract.params["output"].sharding.spec
    tokens = tokens_for(model)
    np.testing.assert_allclose(our_logits(cfg, jax.device_get(restored), tokens),
                               hf_logits(model, tokens), atol=1e-5, rtol=0)
    wrong = micro_config(ffn_dim=192)
    abstract = train_step.build(wrong, mesh).abstract
    with pytest.raises(checkpoint.CheckpointError, match=r"\['w1'\] has shape \(2, 64, 128\)"):
        checkpoint.restore_params(tmp_path / "wd", abstract)
