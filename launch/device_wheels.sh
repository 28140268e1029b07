#!/usr/bin/env bash
# Wheels of what npp_jax needs beyond a JAX + flax + optax + orbax image (grain,
# array_record, portpicker, ml-collections, tensorboardX), for a machine that cannot reach
# a package index. Here:   launch/device_wheels.sh .whl 3.12
# There:   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#          export PYTHONPATH=/tmp/site:$PWD
# (launch/bench_accelerator.sh does the second part itself when WHEELS=.whl is set).
set -euo pipefail
dir=${1:-.whl} pyver=${2:-3.12}
mkdir -p "$dir"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp "${platforms[@]}" -d "$dir" \
  grain array_record portpicker ml-collections tensorboardX
ls -l "$dir"
