"""The one config builder that every `configs/*.py` calls.

`get_config("L")` returns an ml_collections ConfigDict holding every knob of the
reference training script; override any of them on the command line, e.g.
`--config.optim.lr=2e-4 --config.train.epochs=100`.
"""

import dataclasses

import ml_collections

from npp_jax.models.gpt_config import GPTConfig

MODES = ("train", "sample", "eval", "extract")
# Guidance scales of the NPP paper's FID results, per model size.
CFG_SCALES = {"B": 2.0, "L": 1.75, "XL": 1.70, "XXL": 1.65}


def model_config(preset: str, **overrides) -> ml_collections.ConfigDict:
  """All GPTConfig fields of a preset, as a ConfigDict (so each can be overridden)."""
  cfg = GPTConfig.preset(preset, **overrides)
  d = ml_collections.ConfigDict(dataclasses.asdict(cfg))
  d.preset = preset
  return d


def get_config(preset: str = "B", arg: str | None = None) -> ml_collections.ConfigDict:
  """Training config for a model size, with the NPP paper's ImageNet-256 recipe.

  Args:
    preset: model size (B, L, XL, XXL, XXXL, 3B, tiny).
    arg: optional `key=value,key=value` string (from `--config=configs/l.py:key=value`).
  """
  c = ml_collections.ConfigDict()
  c.mode = "train"
  c.seed = 0

  c.model = model_config(preset)
  # The reference's `--mixed-precision bf16`: params float32, matmuls in bf16.
  c.model.dtype = "bfloat16"

  c.data = ml_collections.ConfigDict()
  # A directory of ArrayRecord shards written by `mode=extract` (or the mnist cache).
  c.data.path = ""
  c.data.name = "imagenet_codes"
  c.data.worker_count = 0  # grain multiprocessing workers; 0 reads in the main process
  c.data.prefetch_buffer_size = 4
  c.data.cache_dir = ""  # where embedded datasets are written (default: WORKDIR/data)

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 300
  c.train.global_batch_size = 256
  c.train.patch_level = 3  # patch sides [4, 2, 1]
  c.train.epoch_rate = 0.5  # stage k ends at int(epochs * rate ** (L-1-k))
  c.train.grad_accum_steps = 1
  c.train.ema_decay = 0.0  # 0 disables EMA
  c.train.log_every_steps = 50
  c.train.ckpt_every_steps = 5000
  c.train.keep_checkpoints = 3
  c.train.max_steps = -1  # stop early (for smoke runs); -1 trains the whole schedule
  c.train.init_from = ""  # orbax params directory from `python -m npp_jax.convert`

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.end_lr = 1e-5
  c.optim.weight_decay = 5e-2
  c.optim.beta1 = 0.9
  c.optim.beta2 = 0.95
  c.optim.eps = 1e-8
  c.optim.grad_clip = 1.0
  c.optim.warmup_epochs = 1.0  # the reference code's default; the paper uses 5
  c.optim.decay_ratio = 0.2

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.name = "vq16"  # "grey" for the embedded demo
  c.tokenizer.checkpoint = ""  # vq_ds16_c2i.pt (or its converted directory)
  c.tokenizer.levels = 16  # grey levels (grey tokenizer only)

  c.extract = ml_collections.ConfigDict()
  c.extract.source = "imagefolder"  # or "tfds" (the `data` extra)
  c.extract.data_dir = ""  # ImageFolder root (root/<class>/<image>) or the tfds data_dir
  c.extract.tfds_name = "imagenet2012"
  c.extract.split = "train"
  c.extract.image_size = 256  # extract at the size you train at (grid = image_size / 16)
  c.extract.ten_crop = True  # 10 crop/flip variants per image; False: center + mirror
  c.extract.crop_range = 1.1
  c.extract.out_dir = ""  # default: WORKDIR/codes
  c.extract.images_per_shard = 1024
  c.extract.batch_size = 64  # variants encoded per device step (per host)
  c.extract.num_workers = 8  # image decoding threads

  c.sample = ml_collections.ConfigDict()
  c.sample.checkpoint = ""  # "": newest checkpoint of --workdir; or converted dir / .pt file
  c.sample.use_ema = True  # sample from EMA weights when the run kept them
  c.sample.cfg_scale = CFG_SCALES.get(preset, 1.5)
  c.sample.cfg_interval = -1
  c.sample.temperature = 1.0
  c.sample.top_k = 0
  c.sample.top_p = 1.0
  c.sample.num_images = 50_000  # the ADM evaluator's FID-50k
  c.sample.batch_size = 128  # global; a multiple of the device count
  c.sample.seed = 0
  c.sample.png_classes = ()  # classes shown in samples.png (default: the first 10)
  c.sample.png_per_class = 8
  c.sample.png_scale = 1

  c.eval = ml_collections.ConfigDict()
  c.eval.kind = "inception"  # "mnist_classifier" for the embedded demo
  c.eval.samples = ""  # sample batch .npz (default: newest WORKDIR/samples/samples_*.npz)
  c.eval.reference = ""  # ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz
  c.eval.inception_checkpoint = ""  # pt_inception-2015-12-05-6726825d.pth (given by path)
  c.eval.preprocess = "adm"  # "adm" reproduces the published numbers; or "pytorch_fid"
  c.eval.batch_size = 500
  c.eval.is_split_size = 5000

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  return apply_overrides(c, arg) if arg else c


def apply_overrides(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Applies `a.b=value,c=value` overrides (the optional argument of a config file)."""
  for item in arg.split(","):
    key, _, value = item.partition("=")
    _set_path(c, key.strip(), value.strip())
  return c


def _set_path(c: ml_collections.ConfigDict, key: str, value: str) -> None:
  *parents, leaf = key.split(".")
  node = c
  for p in parents:
    node = node[p]
  old = node[leaf]
  node[leaf] = (
    type(old)(value)
    if old is not None and not isinstance(old, bool)
    else (value.lower() in ("1", "true", "yes") if isinstance(old, bool) else value)
  )


def gpt_config(c: ml_collections.ConfigDict) -> GPTConfig:
  """The GPTConfig described by `c.model` (the preset name is informational)."""
  fields = {f.name for f in dataclasses.fields(GPTConfig)}
  unknown = sorted(set(c.model.keys()) - fields - {"preset"})
  if unknown:
    raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(fields)}.")
  return GPTConfig(**{k: v for k, v in c.model.to_dict().items() if k in fields})
