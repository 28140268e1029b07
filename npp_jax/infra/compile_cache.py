"""JAX's persistent compilation cache: a restarted or resumed job loads its compiled steps
instead of compiling them again (minutes per NPP stage for the large models)."""

import logging

import jax
from jax import monitoring

from npp_jax.infra import storage

log = logging.getLogger(__name__)

OFF = "off"
_counts = {"hits": 0, "misses": 0}


def _count(event: str, **_) -> None:
  if event == "/jax/compilation_cache/cache_hits":
    _counts["hits"] += 1
  elif event == "/jax/compilation_cache/cache_misses":
    _counts["misses"] += 1


monitoring.register_event_listener(_count)


def enable(setting: str, workdir: str) -> str | None:
  """Points JAX's cache at `setting` ("off" = no cache; a directory, local or gs://; ""
  = the one JAX was given (JAX_COMPILATION_CACHE_DIR), else WORKDIR/compile_cache);
  returns the directory used. Call before compiling."""
  if setting == OFF:
    # Off even when JAX was given a cache (JAX_COMPILATION_CACHE_DIR).
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  # A cache the user already gave JAX (one shared by every run on a cluster, say) is kept.
  given = jax.config.jax_compilation_cache_dir
  path = storage.absolute(setting or given or storage.join(workdir, "compile_cache"))
  jax.config.update("jax_compilation_cache_dir", path)
  # Cache what takes a moment to compile (the train, eval and sampling steps), not the
  # many tiny helper computations.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  log.info("compilation cache: %s", path)
  return path


def hits() -> int:
  """Compilations served from the persistent cache so far in this process."""
  return _counts["hits"]
