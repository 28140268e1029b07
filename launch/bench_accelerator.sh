#!/usr/bin/env bash
# The accelerator benchmark of BENCHMARKS.md in one go (issue: speed on an H200), one JSON
# line per measurement appended to $OUT/bench.jsonl (OUT defaults to ./bench_out).
#   launch/bench_accelerator.sh            GPT-B/L as in the table, bf16 (about 10 minutes)
#   TINY=1 launch/bench_accelerator.sh     the same commands on configs/tiny.py (a CPU check)
# On NVIDIA GPUs the token-stage rows and GPT-B sampling also run with the cuDNN attention
# kernel, and sampling with the decode loop in CUDA graphs.
set -uo pipefail
# WHEELS=DIR: install the wheels launch/device_wheels.sh downloaded (machines without an
# index: grain, array_record, ml-collections are not in a bare JAX image).
if [ -n "${WHEELS:-}" ]; then
  ${PYTHON:-python} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
out=${OUT:-bench_out}
mkdir -p "$out"
py=${PYTHON:-python}
if [ "${TINY:-0}" = 1 ]; then
  b=configs/tiny.py l=configs/tiny.py train_batch=8 sample_batch=8 extra=(--repeats=1)
else
  b=configs/b.py l=configs/l.py train_batch=64 sample_batch=32 extra=()
fi
gpu=$($py -c "import jax; print(jax.default_backend() == 'gpu')")
status=0
run() {
  echo "+ ${XLA_FLAGS:+XLA_FLAGS=$XLA_FLAGS }bench $*" >&2
  if ! $py -m npp_jax.bench "$@" "${extra[@]}" | tee -a "$out/bench.jsonl"; then
    echo "{\"failed\": \"bench $*\"}" | tee -a "$out/bench.jsonl"
    status=1
  fi
}
$py -c "import jax, json; d=jax.devices()[0]; print(json.dumps({'jax': jax.__version__, \
  'device': getattr(d, 'device_kind', d.platform), 'count': jax.device_count()}))" \
  | tee -a "$out/bench.jsonl"
# The key rows first (what runs of it get cut short keep): GPT-B's steps at patch sides
# 4, 2, 1 and the whole-schedule ratio (one `bench schedule`), GPT-L's token step, sampling.
run schedule --config=$b --batch=$train_batch
run train --config=$l --batch=$train_batch --patch_side=1
run sample --config=$b --batch=$sample_batch
run sample --config=$l --batch=$sample_batch
# Variants: sampling with all-bf16 weights, with GPT-B's 12 layers unrolled; on NVIDIA GPUs
# the cuDNN flash kernel, and the whole decode loop (while loop included) captured in
# command buffers (CUDA graphs).
run sample --config=$b --batch=$sample_batch --config.sample.precision=bfloat16
run sample --config=$b --batch=$sample_batch --config.sample.scan_unroll=12
if [ "$gpu" = True ]; then
  run train --config=$b --batch=$train_batch --patch_side=1 --config.model.attention=cudnn
  run train --config=$l --batch=$train_batch --patch_side=1 --config.model.attention=cudnn
  run sample --config=$b --batch=$sample_batch --config.model.attention=cudnn
  # +: added to XLA's default command types (a plain list would replace them).
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
    run sample --config=$b --batch=$sample_batch
fi
exit $status
