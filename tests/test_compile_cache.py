"""Which persistent compilation cache a job uses (config.compile_cache)."""

import jax
import pytest

from npp_jax.infra import compile_cache

OPTIONS = (
  "jax_enable_compilation_cache",
  "jax_compilation_cache_dir",
  "jax_persistent_cache_min_compile_time_secs",
  "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture
def jax_cache_options():
  """The test session's cache settings, restored after the test changes them."""
  saved = {name: getattr(jax.config, name) for name in OPTIONS}
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


def test_a_cache_given_to_jax_is_kept_else_the_workdirs(tmp_path, jax_cache_options):
  del jax_cache_options
  workdir = str(tmp_path / "run")
  # JAX_COMPILATION_CACHE_DIR (or jax.config) named one: the default keeps it.
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "shared"))
  assert compile_cache.enable("", workdir) == str(tmp_path / "shared")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "shared")
  # A directory in the config wins over it.
  assert compile_cache.enable(str(tmp_path / "mine"), workdir) == str(tmp_path / "mine")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
  # None given: the workdir's own.
  jax.config.update("jax_compilation_cache_dir", None)
  assert compile_cache.enable("", workdir) == f"{workdir}/compile_cache"
  assert jax.config.jax_compilation_cache_dir == f"{workdir}/compile_cache"
  # "off" is off, whatever JAX was given.
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "shared"))
  assert compile_cache.enable("off", workdir) is None
  assert not jax.config.jax_enable_compilation_cache
