"""lm-evaluation-harness model "llama_jax": loglikelihood, loglikelihood_rolling and
generate_until over a workdir's latest checkpoint (or a Hugging Face directory).

  llama_jax lm_eval --model llama_jax --model_args workdir=DIR --tasks hellaswag

(`llama_jax lm_eval` imports this module, which registers the model, then runs lm-eval's own
command line). lm-eval is an optional extra: without it the class still works on any objects
with an `.args` tuple.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import checkpoint, convert, generate as gen, parallel
from llama_jax.model import Llama

try:
    # lm-eval's get_model imports its built-in models only while the registry is empty: put
    # them there first, or registering ours alone would hide `--model hf` and the rest
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the optional extra is absent: same class, unregistered
    LM = object

    def register_model(*_):
        return lambda cls: cls


@functools.partial(jax.jit, static_argnames="cfg")
def _target_logprobs(params, inputs, targets, *, cfg):
    """[B, T] inputs and targets -> (log p(target) [B, T], target is the argmax [B, T])."""
    logits = Llama(cfg).apply({"params": params}, inputs)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


@register_model("llama_jax")
class LlamaJaxLM(LM):
    def __init__(self, workdir=None, hf=None, config=None, batch_size=8, max_length=None,
                 device=None, max_batch_size=None, **unknown):
        del device, max_batch_size  # lm-eval passes them; placement follows parallel.place
        if unknown:  # a misspelt --model_args key would otherwise be a TypeError traceback
            raise ValueError(f"--model_args {sorted(unknown)} unknown: llama_jax takes workdir, "
                             "hf, config, batch_size and max_length")
        if (workdir is None) == (hf is None):
            raise ValueError("--model_args needs exactly one of workdir=DIR or hf=HF_DIR")
        if LM is not object:
            super().__init__()
        from llama_jax.data.tokenizer import load_tokenizer
        if isinstance(config, str):  # a configs/*.py path, as given in --model_args
            from llama_jax.config import load_config
            config = load_config(config)
        self.cfg, params, tok_path = (convert.load_hf_model(hf) if hf
                                      else checkpoint.load_model(workdir, config))
        if not pathlib.Path(tok_path).exists():
            raise FileNotFoundError(f"{tok_path} is missing: put the model's tokenizer.model "
                                    "or tokenizer.json beside its weights")
        self.tokenizer = load_tokenizer(tok_path, self.cfg.vocab_size)
        self.params = parallel.place(self.cfg, params)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = min(int(max_length or self.cfg.max_seq_len), self.cfg.max_seq_len)

    # ------------------------------------------------------------------------ scoring

    def _split(self, context, continuation):
        """Token ids of (context, continuation), split where the joint encoding splits, so a
        continuation's leading space is tokenized as it is in running text."""
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context) if context else []
        if whole[:len(ctx)] != ctx:
            return [self.tokenizer.bos_id()] + ctx, self.tokenizer.encode(continuation)
        return [self.tokenizer.bos_id()] + ctx, whole[len(ctx):]

    def _score(self, pairs):
        """[(context ids, continuation ids)] -> [(sum of log p(continuation), all greedy)]."""
        results = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            seqs = [(c + t)[-(self.max_length + 1):] for c, t in chunk]  # keep the newest tokens
            width = gen.bucket(max(len(s) for s in seqs) - 1)
            inputs = np.zeros((self.batch_size, width), np.int32)
            targets = np.zeros_like(inputs)
            for row, seq in enumerate(seqs):
                inputs[row, :len(seq) - 1] = seq[:-1]
                targets[row, :len(seq) - 1] = seq[1:]
            logp, greedy = jax.device_get(_target_logprobs(self.params, inputs, targets,
                                                           cfg=self.cfg))
            for row, (seq, (_, cont)) in enumerate(zip(seqs, chunk)):
                span = slice(len(seq) - 1 - len(cont), len(seq) - 1)  # right padding: causal
                results.append((float(logp[row, span].sum()), bool(greedy[row, span].all())))
        return results

    def loglikelihood(self, requests):
        return self._score([self._split(*r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests):
        """Log-likelihood of whole texts, in windows of max_length that each predict new tokens
        with as much preceding text as fits as context."""
        out = []
        for r in requests:
            tokens = [self.tokenizer.bos_id()] + self.tokenizer.encode(r.args[0])
            windows = []
            for s in range(1, len(tokens), self.max_length):
                e = min(s + self.max_length, len(tokens))
                windows.append((tokens[max(0, e - 1 - self.max_length):s], tokens[s:e]))
            out.append(sum(score for score, _ in self._score(windows)))
        return out

    def generate_until(self, requests):
        out = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kwargs.get("max_gen_toks", 64)), self.max_length - 1)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get(
                "do_sample", kwargs.get("temperature", 0.0) > 0) else 0.0
            # the newest context that leaves room for the answer
            prompt = [self.tokenizer.bos_id()] + self.tokenizer.encode(context)
            prompt = prompt[-(self.max_length - max_new):]
            tokens = gen.generate(self.cfg, self.params, [prompt], max_new,
                                  gen.Sampling(temperature), eos_id=self.tokenizer.eos_id())[0]
            text = self.tokenizer.decode(tokens)
            for stop in until:  # cut at the earliest stop sequence
                text = text.split(stop)[0]
            out.append(text)
        return out
