#!/usr/bin/env bash
# Run npp_jax on every worker of a Cloud TPU pod slice (one process per host).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/l.py /shared/runs/l [--config.x=y ...]
# The repository must exist at the same path on every worker, e.g. after
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command "git clone ..."
# Each worker installs jax with the TPU runtime into .venv first (`make install
# EXTRAS=tpu`; a no-op once done).
# jax.distributed.initialize() (NPP_DISTRIBUTED=1) reads the pod topology itself. Use a
# shared --workdir (GCS or NFS) so every host sees the same checkpoints.
set -euo pipefail
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
dir=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd $dir && make -s install EXTRAS=tpu && NPP_DISTRIBUTED=1 .venv/bin/python -m npp_jax.main --config=$config --workdir=$workdir $*"
