"""Llama-3.1-8B, long-context stage: continued pretraining at 131,072 tokens from an 8,192-token
run (configs/llama31_8b.py), as Llama 3.1 extended its context. The model is llama31_8b's
(RoPE theta 500,000 with "llama3" frequency scaling, factor 8 from an original 8,192 context);
only the sequence and how it is split change: each sequence spreads over mesh.context=8 chips
(context parallelism, docs/distributed.md "Context parallelism"), the weights and optimizer
state over fsdp x context (ZeRO over both), and every block is rematerialised.

Meant for a v5p-64 slice (v5p:4x4x2, 32 chips: context 8 x fsdp 4, so 4 sequences at once):
  python -m llama_jax.train --config=configs/llama31_8b_128k.py --workdir=runs/llama31_8b_128k \
      --config.init_from=runs/llama31_8b \
      --config.data.tokenizer_path=runs/llama31_8b_base/tokenizer.json
Check it first without a TPU (AOT compile for the slice on this machine):
  python -m llama_jax.compile --config=configs/llama31_8b_128k.py --topology=v5p:4x4x2
Measured (jax 0.10.2, libtpu, AOT, the second command above): 22.49 GiB per chip of 95 (21.08
GB temporaries), splash attention, 823.9 GB of collectives per chip and step (1.122 x the fsdp
+ key/value-gather minimum), roofline 3,099 tokens/s/chip (42.3 s a step). One microbatch of it:
  python -m llama_jax.compile --config=configs/llama31_8b.py --config.data.seq_len=131072 \
      --config.model.max_seq_len=131072 --config.mesh.context=8 \
      --config.data.global_batch_size=4 --config.model.remat=full --topology=v5p:4x4x2
compiles with splash attention to 20.51 GiB per chip of 95 (18.96 GB temporaries), 102.99 GB of
collectives per chip and step (1.122 x the fsdp + key/value-gather minimum), roofline 3,099
tokens/s/chip. Without context parallelism the slice took batch 32 at 93.39 GiB per chip.
"""

from llama_jax.config import llama3_config


def get_config():
    c = llama3_config(dim=4096, n_heads=32, n_kv_heads=8, n_layers=32, ffn_dim=14336,
                      remat="full")
    c.data.seq_len = 131072
    c.data.global_batch_size = 32  # x 131,072 = 4M tokens a step, as at 8k
    c.train.microbatches = 8  # 4 sequences at once on 32 chips (fsdp 4 x context 8)
    c.mesh.update(fsdp=-1, context=8)
    # a short stage from an 8k run's weights (init_from): 2B tokens, the 8k stage's peak lr
    c.train.update(steps=477, warmup_steps=50)
    return c
