"""Side-by-side CPU throughput: llama_jax vs PyTorch + transformers' LlamaForCausalLM.

  python bench/compare_torch.py --rounds=2 --steps=5

Each measurement runs in its own process, alternating A B A B so that drift of the machine
(other load, frequency) hits both alike. The torch side trains the same shape as
configs/cpu_bench.py with torch.optim.AdamW and gradient clipping, on synthetic tokens.
Needs the test extras (torch==2.13.0, transformers); prints one JSON line.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = dict(vocab=32000, dim=512, layers=8, heads=8, ffn=1536, seq=512, batch=8)


def torch_worker(steps):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["dim"],
                         intermediate_size=SHAPE["ffn"], num_hidden_layers=SHAPE["layers"],
                         num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["heads"],
                         max_position_embeddings=SHAPE["seq"], rms_norm_eps=1e-6,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"]))

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    return {"tokens_per_sec": round(SHAPE["batch"] * SHAPE["seq"] / step_time, 1),
            "step_time_s": round(step_time, 4), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def run(cmd):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        print(json.dumps(torch_worker(args.steps)))
        return
    jax_cmd = [sys.executable, "-m", "llama_jax.bench", "--config=configs/cpu_bench.py",
               f"--steps={args.steps}"]
    torch_cmd = [sys.executable, __file__, "--torch-worker", f"--steps={args.steps}"]
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(run(jax_cmd)["tokens_per_sec"])
        theirs.append(run(torch_cmd)["tokens_per_sec"])
    print(json.dumps({"shape": SHAPE, "llama_jax_tokens_per_sec": ours,
                      "torch_tokens_per_sec": theirs,
                      "ratio_of_medians": round(statistics.median(ours) /
                                                statistics.median(theirs), 3)}))


if __name__ == "__main__":
    main()
