#!/usr/bin/env bash
# Fills in launch/gke_jobset.yaml and applies it with kubectl (see that file for what it needs).
#
#   launch/gke.sh --name=llama-7b --image=IMAGE --tpu=v5p --topology=4x4x2 \
#       --config=configs/llama_7b.py --workdir=gs://my-bucket/llama_7b \
#       [--chips_per_host=4] [--dry-run] [-- TRAIN FLAGS]
#
# --dry-run prints the rendered JobSet and the kubectl command without running kubectl.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

NAME="" IMAGE="" TPU="" TOPOLOGY="" CONFIG="" WORKDIR="" CHIPS_PER_HOST=4
usage() { sed -n '2,8p' "$0" >&2; exit 2; }
parse_args "NAME IMAGE TPU TOPOLOGY CONFIG WORKDIR CHIPS_PER_HOST" "$@"
require NAME IMAGE TPU TOPOLOGY CONFIG WORKDIR
case "$TPU" in  # GKE's node label for each TPU generation
  v4) ACCELERATOR=tpu-v4-podslice ;;
  v5e) ACCELERATOR=tpu-v5-lite-podslice ;;
  v5p) ACCELERATOR=tpu-v5p-slice ;;
  v6e) ACCELERATOR=tpu-v6e-slice ;;
  *) echo "error: --tpu=$TPU is not one of v4, v5e, v5p, v6e" >&2; exit 2 ;;
esac
gcs_workdir
CHIPS=$(( ${TOPOLOGY//x/*} ))
(( CHIPS % CHIPS_PER_HOST == 0 )) || {
  echo "error: topology $TOPOLOGY has $CHIPS chips, not a multiple of --chips_per_host=$CHIPS_PER_HOST" >&2
  exit 2; }

export NAME IMAGE TOPOLOGY CONFIG ACCELERATOR CHIPS_PER_HOST BUCKET MOUNTED_WORKDIR
export HOSTS=$(( CHIPS / CHIPS_PER_HOST ))
TRAIN_FLAGS="$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${EXTRA[@]}")"
export TRAIN_FLAGS
# string.Template fails on any ${FIELD} left unset, so a half-filled JobSet is never applied
RENDERED="$(python3 -c 'import os, string, sys; print(string.Template(sys.stdin.read()).substitute(os.environ))' \
  < "$(dirname "$0")/gke_jobset.yaml")"

if [[ -n "$DRY_RUN" ]]; then
  echo "$RENDERED"
  print_command kubectl apply -f -
else
  print_command kubectl apply -f -
  kubectl apply -f - <<< "$RENDERED"
fi
echo "follow the logs: kubectl logs -f --prefix --max-log-requests=$HOSTS -l jobset.sigs.k8s.io/jobset-name=$NAME"
