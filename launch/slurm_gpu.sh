#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, all its GPUs local devices.
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh configs/l.py /shared/runs/l [--config.x=y ...]
# jax.distributed.initialize() (NPP_DISTRIBUTED=1) reads SLURM's environment for the
# coordinator address, the process count and the process id. --workdir must be shared.
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
config=$1 workdir=$2
shift 2
dir=$(cd "$(dirname "$0")/.." && pwd)
# jax with the CUDA 12 wheels into the shared .venv, once (a no-op when installed; use
# EXTRAS=cuda13 on drivers >= 580).
make -s -C "$dir" install EXTRAS="${NPP_EXTRAS:-cuda}"
srun --ntasks-per-node=1 env NPP_DISTRIBUTED=1 "$dir/.venv/bin/python" -m npp_jax.main \
  --config="$config" --workdir="$workdir" "$@"
