"""Llama-3.2-1B (meta-llama/Llama-3.2-1B, its config.json): dim 2048, 32 heads / 8 kv heads, 16
layers, ffn 8192, vocab 128256 (byte-level BPE, tokenizer.json), RoPE theta 500,000 with
"llama3" frequency scaling (factor 32, low/high frequency factors 1/4, original context 8192) to
a 131,072 context, RMSNorm eps 1e-5; input and output embeddings tied; 1,235,814,400 parameters.

Meta published no pretraining schedule at this size, so the training section is for continued
pretraining: 4M-token batches of 8192-token rows, lr 3e-5 (a tenth of Llama 2's peak), 200 warmup
steps, cosine to 10% over 10B tokens. From the released weights (docs/configs.md):
  python -m llama_jax.convert --from=hf --src=Llama-3.2-1B --dst=runs/llama32_1b_base
  python -m llama_jax.train --config=configs/llama32_1b.py --workdir=runs/llama32_1b \
      --config.init_from=runs/llama32_1b_base \
      --config.data.tokenizer_path=runs/llama32_1b_base/tokenizer.json
"""

from llama_jax.config import llama3_config


def get_config():
    return llama3_config(dim=2048, n_heads=32, n_kv_heads=8, n_layers=16, ffn_dim=8192,
                         rope_scaling_factor=32.0, tie_embeddings=True)
