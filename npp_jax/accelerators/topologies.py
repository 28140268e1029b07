"""Compile-only devices of a named accelerator topology, for ahead-of-time checks.

`devices("v5p:4x4x4")` gives the 64 abstract chips of a TPU v5p slice (libtpu's compiler
targets them: `pip install "jax[tpu]==<installed jax>"`); `devices("h100:8")` gives 8
compile-only NVIDIA H100s (the CUDA plugin: `pip install "jax-cuda12-plugin==<jax>"
"jax-cuda12-pjrt==<jax>"`; no GPU, driver or CUDA libraries needed). A mesh over them
compiles with the real compiler, so memory and cost can be read before renting anything.
GPU names take `<chip>:<chips>`; several hosts of 8 from 16 chips up.
"""

import re
from typing import Any

from npp_jax.accelerators import hardware

# Topology names seen to work with libtpu's get_topology_desc (others of the same form
# usually do too; the compiler says when not).
TPU_EXAMPLES = ("v4:2x2x1", "v5e:2x2", "v5e:4x4", "v5e:16x16", "v5p:2x2x2", "v5p:4x4x4", "v6e:2x2")
# GPU name -> the hardware table's key. Per-chip compiler facts beyond the data sheet
# (shared memory per SM and per block, L2) are NVIDIA's published device properties.
GPU_CHIPS = {"h100": "H100", "h200": "H200", "a100": "A100"}
_GPU_PROPERTIES = {
  "H100": dict(smem_core=233472, smem_optin=232448, l2=52428800, mem_clock_khz=2619000),
  "H200": dict(smem_core=233472, smem_optin=232448, l2=52428800, mem_clock_khz=3201000),
  "A100": dict(smem_core=167936, smem_optin=166912, l2=41943040, mem_clock_khz=1593000),
}
GPUS_PER_HOST = 8


def is_gpu(name: str) -> bool:
  return name.split(":", 1)[0].lower() in GPU_CHIPS


def gpu_target_config(chip_key: str) -> str:
  """The compile-only target description (XLA's GpuTargetConfigProto, text format) of an
  NVIDIA chip, written from the hardware table."""
  spec = next(chip for name, chip in hardware.CHIPS if name == chip_key)
  p = _GPU_PROPERTIES[chip_key]
  mem = int(spec.hbm_gib * hardware.GIB)
  major, minor = spec.compute_capability
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {p["smem_core"]}
  threads_per_core_limit: 2048
  core_count: {spec.sm_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(spec.hbm_gb_per_s * 1e9)}
  l2_cache_size: {p["l2"]}
  clock_rate_ghz: {spec.clock_ghz}
  device_memory_size: {mem}
  shared_memory_per_block_optin: {p["smem_optin"]}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "NVIDIA {chip_key} {spec.hbm_gib:.0f}GiB (compile-only)"
"""


def devices(name: str) -> list[Any]:
  """The abstract devices of topology `name` (see the module docstring); a one-line
  ValueError for a name no compiler knows, naming the package to install when missing."""
  from jax.experimental import topologies  # noqa: PLC0415

  if is_gpu(name):
    kind, _, count = name.partition(":")
    if not count.isdigit() or int(count) < 1:
      raise ValueError(f"--topology={name}: use <gpu>:<chips>, e.g. h100:8.")
    n = int(count)
    hosts, per_host = (1, n) if n <= GPUS_PER_HOST else (n // GPUS_PER_HOST, GPUS_PER_HOST)
    if hosts * per_host != n:
      raise ValueError(f"--topology={name}: above {GPUS_PER_HOST} GPUs use a multiple of 8.")
    config = gpu_target_config(GPU_CHIPS[kind.lower()])
    try:
      topo = topologies.get_topology_desc(
        name, "cuda", target_config=config, topology=f"1x{hosts}x{per_host}"
      )
    except NotImplementedError:
      raise ValueError(
        f"--topology={name} needs the CUDA plugin: pip install "
        '"jax-cuda12-plugin==<installed jax>" "jax-cuda12-pjrt==<installed jax>" '
        "(or `make install-aot`)."
      ) from None
    return list(topo.devices)
  if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", name):
    raise ValueError(
      f"--topology={name!r} is not a topology: use a TPU slice such as {', '.join(TPU_EXAMPLES)} "
      f"or a GPU count such as {', '.join(k + ':8' for k in GPU_CHIPS)}."
    )
  try:
    topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
  except Exception as e:  # noqa: BLE001 (libtpu missing or a name it refuses)
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "tpu" in text.lower() and ("not" in text.lower() or "unknown" in text.lower()):
      text += (
        ' (is libtpu installed? pip install "jax[tpu]==<installed jax>", or `make install-aot`)'
      )
    raise ValueError(f"--topology={name}: {text}") from None
  return list(topo.devices)
