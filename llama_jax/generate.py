"""Text generation with a KV cache: one prefill over the left-padded prompts, then one jitted
decode step per token that attends to the cache instead of recomputing the prefix.

  python -m llama_jax.generate --workdir=runs/tiny --prompt="def "
  python -m llama_jax.generate --hf=HF_DIR --prompt="Hello" --temperature=0.8 --top_p=0.9

Shapes are bucketed to powers of two (prompt length, cache length) and the sampling settings
are traced, so the two functions compile once per bucket, not once per prompt or setting.
"""

import dataclasses
import functools
import pathlib
import sys

from absl import app, flags

from llama_jax import cli


def define_flags():
    """Defined only when run as a program, so tests can import every entry point at once."""
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "configs/*.py the workdir was trained with; "
                                    "needed only without model.json.")
    flags.DEFINE_string("workdir", None, "Workdir: latest checkpoint and tokenizer.")
    flags.DEFINE_string("hf", None, "Hugging Face model directory (instead of --workdir).")
    flags.DEFINE_string("tokenizer", None, "SentencePiece .model or Hugging Face tokenizer.json;"
                        " default: the one beside the weights.")
    flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat for a batch.")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt at most.")
    flags.DEFINE_float("temperature", 0.0, "0 decodes greedily.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Sample within this much probability mass (1: all).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


if __name__ == "__main__":  # --help and flag or config errors answer before JAX loads
    define_flags()
    cli.parse_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llama_jax import checkpoint, convert, parallel, ranges  # noqa: E402
from llama_jax.model import Llama, ModelConfig, init_cache, output_matrix  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"{self} is invalid: need temperature >= 0, top_k >= 0 and "
                             "0 < top_p <= 1")


def sample(logits, key, temperature, top_k, top_p):
    """logits [B, V] -> token ids [B]. The settings are traced scalars, so changing them does
    not recompile: temperature 0 is greedy, top_k 0 and top_p 1 switch those cuts off."""
    v = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V], likeliest first
    rank = jnp.arange(v)
    in_top_k = rank < jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
    # nucleus: the smallest prefix whose probability reaches top_p (the first token always)
    keep = in_top_k & (jnp.cumsum(probs, axis=-1) - probs < top_p)
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    sampled = jax.random.categorical(key, jnp.where(scaled < cutoff, -jnp.inf, scaled))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def bucket(n, smallest=16):
    return max(smallest, 1 << (int(n) - 1).bit_length())


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def _prefill(params, tokens, positions, segment_ids, cache, key, sampling, *, cfg):
    hidden, cache = Llama(cfg).apply({"params": params}, tokens, positions, segment_ids,
                                     return_hidden=True, cache=cache)
    # left padding puts every row's last prompt token in the last slot; projecting only that
    # one keeps [B, T, V] logits of a long prompt out of memory
    last = hidden[:, -1]  # [B, D]
    logits = jnp.einsum("bd,dv->bv", last, output_matrix(params, cfg).astype(last.dtype))
    return sample(logits.astype(jnp.float32), jax.random.fold_in(key, 0), *sampling), cache


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def _decode(params, token, position, cache, key, step, sampling, *, cfg):
    logits, cache = Llama(cfg).apply({"params": params}, token[:, None], position[:, None],
                                     jnp.ones_like(token)[:, None], cache=cache)
    return sample(logits[:, 0], jax.random.fold_in(key, step), *sampling), cache


def generate(cfg: ModelConfig, params, prompts, max_new_tokens, sampling=Sampling(), seed=0,
             eos_id=None, on_token=None):
    """Token lists in, new token lists out (stopping before eos_id or after max_new_tokens).

    on_token(step, tokens [B], done [B]) is called as each token arrives, for streaming.
    """
    lengths = np.array([len(p) for p in prompts])
    if not len(prompts) or lengths.min() == 0:
        raise ValueError("every prompt needs at least one token (the tokenizer adds BOS)")
    if lengths.max() + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"a prompt of {lengths.max()} tokens plus max_new_tokens="
                         f"{max_new_tokens} exceeds model.max_seq_len={cfg.max_seq_len}: "
                         "shorten the prompt or lower max_new_tokens")
    batch, prompt_len = len(prompts), bucket(lengths.max())
    tokens = np.zeros((batch, prompt_len), np.int32)
    positions = np.zeros_like(tokens)
    segment_ids = np.zeros_like(tokens)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt):] = prompt
        positions[row, prompt_len - len(prompt):] = np.arange(len(prompt))
        segment_ids[row, prompt_len - len(prompt):] = 1
    cache = init_cache(cfg, batch, bucket(prompt_len + max_new_tokens))
    key = jax.random.key(seed)
    knobs = (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k),
             jnp.float32(sampling.top_p))
    token, cache = _prefill(params, tokens, positions, segment_ids, cache, key, knobs, cfg=cfg)
    position = jnp.asarray(lengths, jnp.int32)
    out = [[] for _ in prompts]
    done = np.zeros(batch, bool)
    for step in range(max_new_tokens):
        host = np.asarray(token)  # waits for the step: tokens stream as they are made
        for row in np.flatnonzero(~done):
            if host[row] == eos_id:
                done[row] = True
            else:
                out[row].append(int(host[row]))
        if on_token:
            on_token(step, host, done)
        if done.all() or step == max_new_tokens - 1:
            break
        token, cache = _decode(params, token, position + step, cache, key, step + 1, knobs,
                               cfg=cfg)
    return out


def main(argv):
    from llama_jax.data.tokenizer import load_tokenizer
    fl = flags.FLAGS
    if len(argv) > 1 or not fl.prompt:
        raise app.UsageError("give --prompt=TEXT (repeatable) and no positional arguments")
    if (fl.workdir is None) == (fl.hf is None):
        raise app.UsageError("give exactly one of --workdir=DIR or --hf=HF_DIR")
    try:
        ranges.check_flags("generate", {name: fl[name].value for name in ranges.FLAGS["generate"]})
        cfg, params, tok_path = (convert.load_hf_model(fl.hf) if fl.hf
                                 else checkpoint.load_model(fl.workdir, fl.config))
        tok_path = pathlib.Path(fl.tokenizer or tok_path)
        if not tok_path.exists():
            raise FileNotFoundError(f"{tok_path} is missing: pass "
                                    "--tokenizer=PATH/tokenizer.model or tokenizer.json")
        tokenizer = load_tokenizer(tok_path, cfg.vocab_size)
    except (ValueError, KeyError, OSError) as e:
        # a known failure is one line that says the fix, not a traceback wall
        sys.exit(f"error: {e}")
    prompts = [[tokenizer.bos_id()] + tokenizer.encode(p) for p in fl.prompt]
    generated, shown = [], [0]

    def stream(step, tokens, done):  # one prompt: print the text as it grows
        if len(prompts) == 1 and not done[0]:
            generated.append(int(tokens[0]))
            text = tokenizer.decode(generated)
            sys.stdout.write(text[shown[0]:])
            sys.stdout.flush()
            shown[0] = len(text)

    sampling = Sampling(fl.temperature, fl.top_k, fl.top_p)
    longest = max(len(p) for p in prompts)
    if longest + fl.max_new_tokens > cfg.max_seq_len:  # before anything is placed or compiled
        sys.exit(f"error: a prompt of {longest} tokens plus --max_new_tokens={fl.max_new_tokens}"
                 f" exceeds model.max_seq_len={cfg.max_seq_len}: shorten the prompt or lower "
                 "--max_new_tokens")
    params = parallel.place(cfg, params)
    sys.stdout.write(fl.prompt[0] if len(prompts) == 1 else "")
    outs = generate(cfg, params, prompts, fl.max_new_tokens, sampling, fl.seed,
                    tokenizer.eos_id(), stream)
    if len(prompts) == 1:
        print()
    else:
        for prompt, out in zip(fl.prompt, outs):
            print(f"--- {prompt!r}\n{prompt}{tokenizer.decode(out)}")


if __name__ == "__main__":
    cli.run(main)
