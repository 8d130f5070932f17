"""Llama-2-70B (meta-llama/Llama-2-70b-hf; Llama 2 paper, arXiv 2307.09288): dim 8192, 64 heads / 8
kv heads (GQA), 80 layers, ffn 28672, vocab 32000, 4,096 context, RMSNorm eps 1e-5, RoPE theta
10,000; 68,976,648,192 parameters.

The paper's recipe: 4M-token batches (1024 x 4096), peak lr 1.5e-04, AdamW eps 1e-5, 2000 warmup
steps, cosine to 10%, 2T tokens. Continued pretraining from the released weights (docs/configs.md):
  python -m llama_jax.convert --from=hf --src=Llama-2-70b-hf --dst=runs/llama2_70b_base
  python -m llama_jax.train --config=configs/llama2_70b.py --workdir=runs/llama2_70b \
      --config.init_from=runs/llama2_70b_base \
      --config.data.tokenizer_path=runs/llama2_70b_base/tokenizer.model \
      --config.train.lr=3e-5
"""

from llama_jax.config import llama2_config


def get_config():
    return llama2_config(0.00015, dim=8192, n_heads=64, n_kv_heads=8, n_layers=80,
                         ffn_dim=28672)
