"""Llama-2-13B (meta-llama/Llama-2-13b-hf; Llama 2 paper, arXiv 2307.09288): dim 5120, 40 heads, 40
layers, ffn 13824, vocab 32000, 4,096 context, RMSNorm eps 1e-5, RoPE theta 10,000;
13,015,864,320 parameters.

The paper's recipe: 4M-token batches (1024 x 4096), peak lr 3.0e-04, AdamW eps 1e-5, 2000 warmup
steps, cosine to 10%, 2T tokens. Continued pretraining from the released weights (docs/configs.md):
  python -m llama_jax.convert --from=hf --src=Llama-2-13b-hf --dst=runs/llama2_13b_base
  python -m llama_jax.train --config=configs/llama2_13b.py --workdir=runs/llama2_13b \
      --config.init_from=runs/llama2_13b_base \
      --config.data.tokenizer_path=runs/llama2_13b_base/tokenizer.model \
      --config.train.lr=3e-5
"""

from llama_jax.config import llama2_config


def get_config():
    return llama2_config(0.0003, dim=5120, n_heads=40, n_layers=40)
