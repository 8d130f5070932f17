#!/usr/bin/env bash
# Fills in launch/gke_jobset.yaml and applies it with kubectl (see that file for what it needs).
#
#   launch/gke.sh --name=llama-7b --image=IMAGE --tpu=v5p --topology=4x4x2 \
#       --config=configs/llama_7b.py --workdir=gs://my-bucket/llama_7b \
#       [--chips_per_host=4] [--slices=1] [--dry-run] [-- TRAIN FLAGS]
#
# --slices=N runs on N slices of --topology (N node pools) with --config.mesh.slices=N.
# --dry-run prints the rendered JobSet and the kubectl command without running kubectl.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

NAME="" IMAGE="" TPU="" TOPOLOGY="" CONFIG="" WORKDIR="" CHIPS_PER_HOST=4 SLICES=1
usage() { sed -n '2,9p' "$0" >&2; exit 2; }
parse_args "NAME IMAGE TPU TOPOLOGY CONFIG WORKDIR CHIPS_PER_HOST SLICES" "$@"
require NAME IMAGE TPU TOPOLOGY CONFIG WORKDIR
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || { echo "error: --slices=$SLICES must be a positive integer" >&2; exit 2; }
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

export NAME IMAGE TOPOLOGY CONFIG ACCELERATOR CHIPS_PER_HOST BUCKET MOUNTED_WORKDIR SLICES
export HOSTS=$(( CHIPS / CHIPS_PER_HOST ))
MEGASCALE_ENV="[]"
if (( SLICES > 1 )); then
  EXTRA+=("--config.mesh.slices=$SLICES")
  # libtpu's multi-slice runtime: the slice count, this pod's slice (its Job's index in the
  # JobSet) and slice 0's first pod, reached through the JobSet's DNS names
  MEGASCALE_ENV="$(python3 -c 'import json, sys; name, slices = sys.argv[1:]; print(json.dumps([
    {"name": "MEGASCALE_NUM_SLICES", "value": slices},
    {"name": "MEGASCALE_SLICE_ID", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.labels['"'"'jobset.sigs.k8s.io/job-index'"'"']"}}},
    {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{name}-slice-0-0.{name}"},
    {"name": "MEGASCALE_PORT", "value": "8080"}]))' "$NAME" "$SLICES")"
fi
TRAIN_FLAGS="$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${EXTRA[@]}")"
export TRAIN_FLAGS MEGASCALE_ENV
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
echo "follow the logs: kubectl logs -f --prefix --max-log-requests=$(( HOSTS * SLICES )) -l jobset.sigs.k8s.io/jobset-name=$NAME"
