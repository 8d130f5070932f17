"""Llama-3.1-70B (meta-llama/Llama-3.1-70B, its config.json): dim 8192, 64 heads / 8 kv heads, 80
layers, ffn 28672, vocab 128256 (byte-level BPE, tokenizer.json), RoPE theta 500,000 with
"llama3" frequency scaling (factor 8, low/high frequency factors 1/4, original context 8192) to
a 131,072 context, RMSNorm eps 1e-5; 70,553,706,496 parameters.

Meta published no pretraining schedule at this size, so the training section is for continued
pretraining: 4M-token batches of 8192-token rows, lr 3e-5 (a tenth of Llama 2's peak), 200 warmup
steps, cosine to 10% over 10B tokens. From the released weights (docs/configs.md):
  python -m llama_jax.convert --from=hf --src=Llama-3.1-70B --dst=runs/llama31_70b_base
  python -m llama_jax.train --config=configs/llama31_70b.py --workdir=runs/llama31_70b \
      --config.init_from=runs/llama31_70b_base \
      --config.data.tokenizer_path=runs/llama31_70b_base/tokenizer.json
Its 131,072-token stage fits on 32 v5p chips with each sequence split over 8 (AOT, libtpu 0.0.52:
60.71 GiB per chip of 95, docs/distributed.md "Context parallelism"):
  python -m llama_jax.compile --config=configs/llama31_70b.py --config.data.seq_len=131072 \
      --config.model.max_seq_len=131072 --config.mesh.context=8 \
      --config.data.global_batch_size=4 --config.model.remat=full --topology=v5p:4x4x2
"""

from llama_jax.config import llama3_config


def get_config():
    return llama3_config(dim=8192, n_heads=64, n_kv_heads=8, n_layers=80, ffn_dim=28672)
