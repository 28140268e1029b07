"""Lets every process of a one-machine test cluster keep its own compiled programs.

JAX writes the persistent compilation cache from process 0 only, expecting the other hosts
to read its entries; on CPU a program's key names the process's own devices, so processes
1, 2, ... never find one and compile every program again in every run (about 80 CPU-s of
the suite, on the path of each two-host test). On a TPU pod the hosts' keys agree, so this
is what real hardware gives. Test workers call `install()` before compiling; if JAX's
internals differ from what this expects, it changes nothing (the runs are only slower).
"""

import inspect


def install() -> bool:
  """Makes processes other than 0 write their own cache entries; True if it could."""
  try:
    from jax._src import compilation_cache, compiler, config, distributed  # noqa: PLC0415
  except ImportError:
    return False
  write = getattr(compiler, "_cache_write", None)
  want = ["cache_key", "compile_time_secs", "module_name", "backend", "executable"]
  if write is None or list(inspect.signature(write).parameters)[:5] != want:
    return False

  def write_on_every_host(cache_key, compile_time_secs, module_name, backend, executable, *rest):
    if (
      distributed.global_state.process_id == 0
      or any(rest)  # host callbacks: JAX never caches those
      or compile_time_secs < config.persistent_cache_min_compile_time_secs.value
    ):
      return write(cache_key, compile_time_secs, module_name, backend, executable, *rest)
    compilation_cache.put_executable_and_time(
      cache_key, module_name, executable, backend, int(compile_time_secs)
    )

  compiler._cache_write = write_on_every_host
  return True
