#!/usr/bin/env bash
# Trains on Cloud TPU VM slices: creates them (or reuses them), installs this checkout on every
# worker, mounts the gs:// bucket, runs the train command on all workers at once (--worker=all)
# and streams their output here. jax.distributed finds the other workers itself.
#
#   launch/tpu_pod.sh --name=llama-7b --zone=us-east5-a --type=v5p-64 \
#       --config=configs/llama_7b.py --workdir=gs://my-bucket/llama_7b [--slices=N] \
#       [--dry-run] [-- TRAIN FLAGS]
#
# --slices=N (N > 1) asks for N slices of --type as one multi-slice queued resource (nodes
# NAME-0 ... NAME-(N-1), joined by the data-center network) and trains with
# --config.mesh.slices=N; TPU VMs of a multi-slice queued resource carry the MEGASCALE_*
# settings libtpu and jax.distributed read, so nothing else is passed.
# --dry-run prints every command instead of running it (nothing touches gcloud).
# The workdir bucket is mounted with gcsfuse at /gcs/BUCKET on each worker, because the trainer
# reads and writes its workdir as a local path.
set -euo pipefail

source "$(dirname "$0")/lib.sh"
NAME="" ZONE="" TYPE="" CONFIG="" WORKDIR="" SLICES=1
VERSION="v2-alpha-tpuv5"  # TPU VM runtime image; v4: tpu-ubuntu2204-base
usage() { sed -n '2,17p' "$0" >&2; exit 2; }
parse_args "NAME ZONE TYPE VERSION CONFIG WORKDIR SLICES" "$@"
require NAME ZONE TYPE CONFIG WORKDIR
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || { echo "error: --slices=$SLICES must be a positive integer" >&2; exit 2; }
gcs_workdir

run() {  # prints the command; runs it unless --dry-run
  print_command "$@"
  [[ -n "$DRY_RUN" ]] || "$@"
}
NODES=("$NAME")
if (( SLICES > 1 )); then
  NODES=()
  for (( i = 0; i < SLICES; i++ )); do NODES+=("$NAME-$i"); done
fi
on_all_workers() {  # every worker of every slice; the slices at once (one after another in a dry run)
  local node pids=()
  for node in "${NODES[@]}"; do
    if [[ -n "$DRY_RUN" ]]; then
      run gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" --worker=all --command="$1"
    else
      run gcloud compute tpus tpu-vm ssh "$node" --zone="$ZONE" --worker=all --command="$1" &
      pids+=("$!")
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

# 1. the slices: reuse them when they exist (a dry run cannot ask, so it shows the create)
if (( SLICES == 1 )); then
  if [[ -n "$DRY_RUN" ]] || ! gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" \
      >/dev/null 2>&1; then
    run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" \
      --version="$VERSION"
  fi
elif [[ -n "$DRY_RUN" ]] || ! gcloud compute tpus queued-resources describe "$NAME" \
    --zone="$ZONE" >/dev/null 2>&1; then
  run gcloud compute tpus queued-resources create "$NAME" --zone="$ZONE" \
    --accelerator-type="$TYPE" --runtime-version="$VERSION" --node-count="$SLICES" \
    --node-prefix="$NAME"
  # the request waits in a queue until all N slices can be provisioned together
  until [[ -n "$DRY_RUN" ]] || [[ "$(gcloud compute tpus queued-resources describe "$NAME" \
      --zone="$ZONE" --format='value(state.state)')" == ACTIVE ]]; do sleep 30; done
fi
(( SLICES == 1 )) || EXTRA+=("--config.mesh.slices=$SLICES")

# 2. this checkout (committed files) on every worker, with the pinned packages and libtpu
ARCHIVE="/tmp/llama_jax_$$.tar.gz"
run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$ARCHIVE" HEAD
for node in "${NODES[@]}"; do
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$node:~/llama_jax.tar.gz" --zone="$ZONE" \
    --worker=all
done
on_all_workers "mkdir -p ~/llama_jax && tar -xzf ~/llama_jax.tar.gz -C ~/llama_jax && \
cd ~/llama_jax && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt \
jaxlib==0.10.2 libtpu==0.0.52 && .venv/bin/pip install -q --no-deps -e ."

# 3. the bucket as a directory on every worker
on_all_workers "command -v gcsfuse >/dev/null || { \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && \
sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; } && \
sudo mkdir -p /gcs/$BUCKET && sudo chown \$USER /gcs/$BUCKET && \
{ mountpoint -q /gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /gcs/$BUCKET; }"

# 4. train: the same command on every worker; output streams back through ssh
TRAIN="cd ~/llama_jax && .venv/bin/python -m llama_jax.train --config=$CONFIG --workdir=$MOUNTED_WORKDIR"
for flag in "${EXTRA[@]}"; do TRAIN+=" $(printf '%q' "$flag")"; done
on_all_workers "set -o pipefail; $TRAIN 2>&1 | tee -a ~/train.log"
