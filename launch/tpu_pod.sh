#!/usr/bin/env bash
# Run npp_jax on every worker of a Cloud TPU pod slice (one process per host).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/l.py gs://BUCKET/runs/l [--config.x=y ...]
# The repository must exist at the same path on every worker, e.g. after
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command "git clone ..."
# Each worker installs jax with the TPU runtime and the gs:// clients into .venv first
# (`make install EXTRAS=tpu`, or NPP_EXTRAS; a no-op once done).
# jax.distributed.initialize() (NPP_DISTRIBUTED=1) reads the pod topology itself. The
# workdir must be one every host sees: a gs:// bucket (or NFS).
# NPP_CHECK=TOPOLOGY (e.g. v5p:4x4x4) first compiles every stage's train step here, for
# that topology and with the same overrides (`python -m npp_jax.aot`, needs
# `make install-aot`), and launches nothing if a stage does not fit its chips.
set -euo pipefail
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
dir=$(cd "$(dirname "$0")/.." && pwd)
if [[ -n "${NPP_CHECK:-}" ]]; then
  overrides=()
  for a in "$@"; do [[ $a == --config.* ]] && overrides+=("$a"); done
  "${PYTHON:-$dir/.venv/bin/python}" -m npp_jax.aot "--config=$config" "--topology=$NPP_CHECK" \
    --programs=train --require_fit "${overrides[@]}"
fi
# Every word quoted for the remote shell, so paths and overrides with spaces arrive whole.
args=$(printf ' %q' "--config=$config" "--workdir=$workdir" "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd $(printf %q "$dir") && make -s install EXTRAS=$(printf %q "${NPP_EXTRAS:-tpu}") && NPP_DISTRIBUTED=1 .venv/bin/python -m npp_jax.main$args"
