"""Every config file against the presets and the NPP schedule; the one override syntax."""

import pathlib
import re

import pytest
from absl import flags
from ml_collections import config_flags

from npp_jax import config_lib, npp
from npp_jax.models import gpt
from npp_jax.models.gpt_config import PRESETS

from .helpers import CONFIGS, load_config_file

NAMES = sorted(p.stem for p in CONFIGS.glob("*.py"))
PACKAGE = pathlib.Path(__file__).parent.parent / "npp_jax"


def parse(*args):
  """The config as `python -m npp_jax.main --config=... ARGS` sees it."""
  argv = ["prog", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def test_every_config_file_is_checked():
  assert {"b", "l", "xl", "xxl", "xxxl", "3b", "tiny", "mnist"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_file_fits_its_preset_and_schedule(name):
  c = load_config_file(name)
  config_lib.check_mode(c)
  cfg = config_lib.gpt_config(c)  # raises when model.preset disagrees with the shape
  preset = c.model.preset
  if preset != config_lib.CUSTOM:
    key = "tiny" if preset == "tiny" else preset.upper()
    assert {k: getattr(cfg, k) for k in PRESETS[key]} == PRESETS[key]
    assert name.startswith("extract") or name in (key.lower(), "imagenet")
  for side in npp.patch_sides(c.train.patch_level):
    npp.check_patch_side(cfg.grid, side)
  ends = npp.stage_boundaries(c.train.epochs, c.train.patch_level, c.train.epoch_rate)
  assert ends[-1] == c.train.epochs
  assert config_lib.vq_config(c).codebook_size == cfg.vocab_size
  assert gpt.param_count(cfg) > 0  # shapes only: nothing compiles


def test_imagenet_configs_state_the_paper_recipe():
  """`configs/imagenet.py:SIZE` is the recipe, each `configs/<size>.py` the same config."""
  sizes = {"b": 2.0, "l": 1.75, "xl": 1.70, "xxl": 1.65, "xxxl": 1.5, "3b": 1.5}
  for name, scale in sizes.items():
    c = parse(f"--config={CONFIGS / 'imagenet.py'}:{name.upper()}")
    assert c.to_dict() == load_config_file(name).to_dict(), name
    assert c.model.preset == name.upper()
    ends = npp.stage_boundaries(c.train.epochs, c.train.patch_level, c.train.epoch_rate)
    assert ends == [75, 150, 300] and npp.patch_sides(c.train.patch_level) == [4, 2, 1]
    assert c.train.global_batch_size == 256 and c.optim.lr == 1e-4
    assert c.sample.cfg_scale == scale
    fsdp = name in ("xl", "xxl", "xxxl", "3b")  # the train state split over every chip
    assert (c.mesh.data, c.mesh.fsdp) == ((1, -1) if fsdp else (-1, 1)), name


def test_every_key_can_be_set_on_the_command_line():
  c = load_config_file("b")
  samples = {int: ("7", 7), float: ("0.5", 0.5), str: ("x", "x"), bool: ("false", False)}
  samples[tuple] = ("(1,2)", (1, 2))
  leaves = list(_leaves(c))
  assert len(leaves) > 70
  for path, value in leaves:
    text, want = samples[type(value) if value is not None else _PLACEHOLDER_TYPES[path]]
    node = parse(f"--config={CONFIGS / 'b.py'}", f"--config.{path}={text}")
    for part in path.split("."):
      node = node[part]
    assert node == want, path


def test_tokenizer_preset_from_the_command_line():
  c = parse(f"--config={CONFIGS / 'b.py'}", "--config.tokenizer.preset=VQ-8")
  assert config_lib.vq_config(c).downsample == 8
  c = parse(f"--config={CONFIGS / 'b.py'}", "--config.tokenizer.ch=64")
  assert config_lib.vq_config(c).ch == 64
  with pytest.raises((flags.Error, AttributeError), match="bogus"):
    parse(f"--config={CONFIGS / 'b.py'}", "--config.tokenizer.bogus=1")


def test_bad_model_preset_and_mode_are_one_line_errors():
  c = parse(f"--config={CONFIGS / 'b.py'}", "--config.model.preset=L")
  with pytest.raises(ValueError, match=r"preset='L' but the model has dim=768.*configs/l.py"):
    config_lib.gpt_config(c)
  c = parse(f"--config={CONFIGS / 'b.py'}", "--config.model.preset=huge")
  with pytest.raises(ValueError, match="'huge' is not a model size"):
    config_lib.gpt_config(c)
  c = parse(f"--config={CONFIGS / 'b.py'}", "--config.mode=train_and_sample")
  with pytest.raises(ValueError, match="config.mode='train_and_sample'; choose one of"):
    config_lib.check_mode(c)


def test_code_reads_only_declared_keys():
  """Every `c.section.key` the package reads exists in the ConfigDict (no hidden `.get`)."""
  c = config_lib.get_config("B")
  pattern = re.compile(r"\bc\.(\w+)(?:\.(\w+))?")
  seen = 0
  for path in PACKAGE.rglob("*.py"):
    text = path.read_text()
    assert not re.search(r"\bc(\.\w+)*\.get\(", text), f"{path}: read config keys directly"
    for section, key in pattern.findall(text):
      if section in ("update", "to_dict", "lock", "items", "keys"):
        continue
      assert section in c, f"{path}: c.{section} is not declared"
      if (
        key
        and isinstance(c[section], type(c))
        and key not in ("to_dict", "update", "items", "keys")
      ):
        assert key in c[section], f"{path}: c.{section}.{key} is not declared"
        seen += 1
  assert seen > 50  # positive control: the pattern does find the reads


# Keys whose default is None: the type the command line parses them as.
_PLACEHOLDER_TYPES = {
  "model.n_kv_head": int,
  "model.ffn_dim_multiplier": float,
  "tokenizer.ch": int,
  "tokenizer.z_channels": int,
}


def _leaves(c, prefix=""):
  for k, v in c.items():
    path = f"{prefix}{k}"
    if hasattr(v, "items"):
      yield from _leaves(v, path + ".")
    else:
      yield path, v


def test_command_line_errors_are_one_line(tmp_path):
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  for args, message in (
    (["--config.train.epoch=3"], "unknown config key 'epoch' in --config.train.epoch; did you"),
    (["--config.trian.epochs=3"], "unknown config key 'trian'"),
    (["--config.train.epochs=abc"], "invalid literal for int()"),
    (["--config.mode=serve"], "config.mode='serve'; choose one of"),
    ([], "config.data.path is empty"),
  ):
    cmd = [sys.executable, "-m", "npp_jax.main", f"--config={CONFIGS / 'b.py'}"]
    res = subprocess.run(
      [*cmd, f"--workdir={tmp_path}", *args], capture_output=True, text=True, timeout=300
    )
    assert res.returncode != 0 and message in res.stderr, (args, res.stderr[-500:])
    assert "Traceback" not in res.stderr, args
  # The run that reached its job left its log, the command and the error in it.
  (log,) = (tmp_path / "logs").iterdir()
  text = log.read_text()
  assert log.name.startswith("train-") and "command: " in text, text
  assert "ERROR error: config.data.path is empty" in text, text


def test_a_broken_config_file_and_a_missing_cluster_are_one_line(tmp_path):
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  broken = tmp_path / "broken.py"
  broken.write_text("from npp_jax import config_lib\n\ndef get_config()\n  return None\n")
  cases = (
    ([f"--config={broken}"], {}, f"error: config file {broken} line 3: expected ':'"),
    (
      [f"--config={CONFIGS / 'tiny.py'}"],
      {"NPP_DISTRIBUTED": "1"},
      "error: NPP_DISTRIBUTED=1 or config.distributed asks for several hosts, but JAX found no",
    ),
  )
  for args, env, message in cases:
    cmd = [sys.executable, "-m", "npp_jax.main", *args, f"--workdir={tmp_path / 'wd'}"]
    res = subprocess.run(
      cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )
    assert res.returncode == 2 and message in res.stderr, res.stderr[-800:]
    assert "Traceback" not in res.stderr


def test_every_config_key_has_a_meaning_and_print_config_lists_them():
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  from npp_jax.infra import checkpoint  # noqa: PLC0415

  meanings = config_lib.key_meanings()
  keys = checkpoint.flatten(checkpoint.config_to_dict(config_lib.get_config("B")))
  assert sorted(k for k in keys if not meanings.get(k)) == []
  cmd = [sys.executable, "-m", "npp_jax.main", f"--config={CONFIGS / 'l.py'}", "--print_config"]
  res = subprocess.run(
    [*cmd, "--config.model.n_kv_head=4"], capture_output=True, text=True, timeout=300
  )
  assert res.returncode == 0, res.stderr[-800:]
  lines = res.stdout.splitlines()
  assert len(lines) == len(keys)
  kv = "model.n_kv_head = 4  # key/value heads for grouped-query attention (None: n_head)"
  assert kv in lines
  assert "train.epochs = 300  # passes over the data, all NPP stages together" in lines


def test_fixed_keys_are_the_fields_gptconfig_marks_fixed():
  """The keys a checkpoint must keep come from GPTConfig's own field marks (plus the
  schedule's), and every one is a key of the config."""
  import dataclasses

  from npp_jax.models.gpt_config import GPTConfig

  marked = {f.name for f in dataclasses.fields(GPTConfig) if f.metadata.get("fixed")}
  assert {"dim", "n_layer", "vocab_size", "grid", "class_dropout_prob"} <= marked
  assert "dtype" not in marked and "scan_unroll" not in marked  # compute settings may change
  model_keys = {k.split(".", 1)[1] for k in config_lib.FIXED_KEYS if k.startswith("model.")}
  assert model_keys == marked
  c = config_lib.get_config("B")
  for key in config_lib.FIXED_KEYS:
    section, _, name = key.rpartition(".")
    assert name in (c[section] if section else c), key
