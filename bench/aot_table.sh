#!/usr/bin/env bash
# The AOT table of docs/distributed.md ("Measured plans"), recompiled row by row on this machine
# (CPU + libtpu, nothing allocated):
#   bash bench/aot_table.sh OUT.jsonl [ROW ...]
# Each JSON line holds the row name, its exact command, the JSON llama_jax.compile printed and
# the wall time. ROW names pick rows (default: all); one row's failure does not stop the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/aot_table.sh OUT.jsonl [ROW ...]}
shift
py=${PYTHON:-.venv/bin/python}
common="--config.model.remat=full --config.train.loss_chunk_size=512"
rows=$(cat <<'ROWS'
7b_v5p8 llama_7b v5p:2x2x1 --config.data.global_batch_size=16
7b_v5p8_paper llama_7b v5p:2x2x1 --config.train.microbatches=128
65b_v5p64 llama_65b v5p:4x4x2 --config.data.global_batch_size=64
65b_v5p128 llama_65b v5p:4x4x4 --config.data.global_batch_size=128
65b_v5p64_xla llama_65b v5p:4x4x2 --config.data.global_batch_size=64 --config.model.attention=xla
65b_v5p128_xla llama_65b v5p:4x4x4 --config.data.global_batch_size=128 --config.model.attention=xla
65b_v5p64_paper llama_65b v5p:4x4x2 --config.train.microbatches=32
13b_v5p16_paper llama_13b v5p:2x2x2 --config.train.microbatches=64
33b_v5p32_paper llama_33b v5p:2x2x4 --config.train.microbatches=32
7b_v4_32 llama_7b v4:2x2x4 --config.data.global_batch_size=64
7b_v5e_16 llama_7b v5e:4x4 --config.data.global_batch_size=16
13b_v4_64 llama_13b v4:4x4x2 --config.data.global_batch_size=32
65b_v4_128_tp llama_65b v4:4x4x4 --config.data.global_batch_size=16 --config.mesh.fsdp=16 --config.mesh.tensor=4 --config.sharding_rules=fsdp_tp
ROWS
)
while read -r row config topology overrides; do
  if [ $# -gt 0 ] && [[ " $* " != *" $row "* ]]; then continue; fi
  cmd="python -m llama_jax.compile --config=configs/$config.py --topology=$topology $overrides $common"
  start=$(date +%s%N)
  # shellcheck disable=SC2086
  result=$($py -m llama_jax.compile --config=configs/$config.py --topology=$topology \
      $overrides $common 2>/dev/null | tail -1)
  tenths=$(( ($(date +%s%N) - start) / 100000000 ))
  [ -n "$result" ] || result='{"error": "no JSON line (see the command'"'"'s stderr)"}'
  printf '{"row": "%s", "cmd": "%s", "result": %s, "wall_s": %d.%d}\n' \
      "$row" "$cmd" "$result" $((tenths / 10)) $((tenths % 10)) | tee -a "$out"
done <<< "$rows"
