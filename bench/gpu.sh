#!/usr/bin/env bash
# The whole GPU benchmark in one go, sized for a short slot on one H100/H200:
#   bash bench/gpu.sh [OUT_DIR]
# Sets up the stack, prints the device, then runs llama_jax.bench on configs/gpu_1b.py (~1B
# params, seq 2048, bfloat16 compute, cuDNN flash attention) at several batch sizes and remat
# policies, one process each so an out-of-memory variant does not stop the others. Every JSON
# line goes to OUT_DIR/gpu_bench.jsonl; a table is printed last.
#
# Stack: with a package registry in reach, a fresh .venv-gpu gets the pinned requirements.txt
# plus jax's CUDA 12 plugin of the same version. Without one (an offline GPU box), it uses the
# python3 already there if its jax sees a GPU, adding ml_collections from bench/wheels or .whl
# when missing. GPU_BENCH_STEPS (default 8) sets the timed steps per variant.
# GPU_BENCH_VARIANTS replaces the variant table below (same columns, one variant a line).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_bench}
mkdir -p "$out"
steps=${GPU_BENCH_STEPS:-8}

jax_version=$(sed -n 's/^jax==//p' requirements.txt)
py=python3
if python3 -m pip download -q --no-deps --timeout 5 --retries 0 -d /tmp/probe \
    "jax==$jax_version" >/dev/null 2>&1; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q -r requirements.txt \
    "jax-cuda12-plugin[with-cuda]==$jax_version" "jax-cuda12-pjrt==$jax_version"
  py=.venv-gpu/bin/python
else
  echo "no package registry in reach: using $(command -v python3) as it is"
  for dir in bench/wheels .whl; do
    if ! python3 -c "import ml_collections" 2>/dev/null && ls "$dir"/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --target /tmp/site "$dir"/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
  done
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95  # the benchmark is the only user of the card
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$py -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices()); assert jax.default_backend() == 'gpu', 'no GPU'" \
  || exit 1

# name | batch | remat | loss chunk | attention | documents per row (0: no segment ids)
variants=${GPU_BENCH_VARIANTS:-"
b16-none-cudnn     16 none          0   auto 1
b16-none-cudnn-nos 16 none          0   auto 0
b16-full-cudnn     16 full          0   auto 1
b24-none-cudnn     24 none          512 auto 1
b48-dots-cudnn     48 dots_saveable 512 auto 1
b48-dots-cudnn-d4  48 dots_saveable 512 auto 4
b48-dots-cudnn-d32 48 dots_saveable 512 auto 32
b48-dots-cudnn-nos 48 dots_saveable 512 auto 0
b64-dots-cudnn     64 dots_saveable 512 auto 1
b96-min-cudnn      96 minimal       512 auto 1
b8-none-xla        8  none          0   xla  1
"}
: > "$out/gpu_bench.jsonl"
while read -r name batch remat chunk attention documents; do
  [ -z "$name" ] && continue
  echo "== $name"
  if line=$($py -m llama_jax.bench --config=configs/gpu_1b.py --steps="$steps" \
      --config.data.global_batch_size="$batch" --config.model.remat="$remat" \
      --config.train.loss_chunk_size="$chunk" --config.model.attention="$attention" \
      --documents="$documents" 2>"$out/$name.log" | tail -1); then
    echo "$line" | tee -a "$out/gpu_bench.jsonl"
  else  # the first error line of its log, e.g. RESOURCE_EXHAUSTED when the batch does not fit
    $py -c 'import json, sys; print(json.dumps({"variant": sys.argv[1], "error": sys.argv[2]}))' \
      "$name" "$(grep -E 'RESOURCE_EXHAUSTED|Error' "$out/$name.log" | tail -1 | cut -c1-300)" \
      | tee -a "$out/gpu_bench.jsonl"
  fi
done <<< "$variants"

$py - "$out/gpu_bench.jsonl" <<'EOF'
import json, sys
print(f"{'batch':>5} {'remat':>13} {'chunk':>5} {'attn':>6} {'docs':>4} {'tok/s':>9} "
      f"{'step s':>7} {'MFU':>6} {'compile s':>9} {'peak GiB':>8}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" in r:
        print(f"{r['variant']}: failed: {r['error'][:100]}")
        continue
    c = r["config"]
    peak = (r["device_peak_bytes_in_use"] or 0) / 2**30
    print(f"{c['global_batch_size']:>5} {c['remat']:>13} {c['loss_chunk_size']:>5} "
          f"{c['attention']:>6} {c['documents']:>4} {r['tokens_per_sec']:>9.0f} "
          f"{r['step_time_s']:>7.3f} {r['mfu']:>6.3f} {r['compile_s']:>9.1f} {peak:>8.1f}")
EOF
