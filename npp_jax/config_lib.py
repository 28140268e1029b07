"""The one config surface: `get_config(preset)` declares every key the code reads.

`configs/*.py` call it and set their recipe; override any key on the command line with
ml_collections' syntax, e.g. `--config.optim.lr=2e-4 --config.tokenizer.preset=VQ-8`.
`gpt_config(c)` and `vq_config(c)` turn the ConfigDict into the models' dataclasses. The
checks of config values, against each other and against the devices, are here too
(`check_training`, `check_sampling`, `check_eval`, `check_tokenizer`, `check_study`): each
job calls its own before anything compiles. What can only be known from a file (a dataset,
a checkpoint, weights) is checked where it is read.
"""

import copy
import dataclasses
import inspect
import json
import logging
import re

import ml_collections
from ml_collections import config_dict

from npp_jax import npp, sharding
from npp_jax.models.gpt_config import FIXED_FIELDS, PRESETS, GPTConfig
from npp_jax.models.vqgan import VQ_PRESETS, VQConfig

log = logging.getLogger(__name__)

MODES = ("train", "sample", "eval", "extract")
TOKENIZERS = ("vq", "grey")
EVAL_KINDS = ("inception", "mnist_classifier")
# jax.default_matmul_precision values accepted for the VQ tokenizer.
PRECISIONS = ("float32", "tensorfloat32", "bfloat16", "default")
# Guidance scales of the NPP paper's FID results, per model size.
CFG_SCALES = {"B": 2.0, "L": 1.75, "XL": 1.70, "XXL": 1.65}
# Sizes whose train state is split over every chip by default (mesh.fsdp = -1).
FSDP_PRESETS = ("XL", "XXL", "XXXL", "3B")
# `model.preset` of a model whose shape is not one of the presets.
CUSTOM = "custom"
# Keys a checkpoint is continued with only when they are as saved: what its weights are
# (GPTConfig's fixed fields) and what maps a step to its stage and data.
FIXED_KEYS = tuple(f"model.{name}" for name in FIXED_FIELDS) + (
  "train.global_batch_size",
  "train.epochs",
  "train.patch_level",
  "train.epoch_rate",
  "train.ema_decay",
  "seed",
)
# Fields that decide which preset a model is.
_SHAPE_FIELDS = ("dim", "n_layer", "n_head")


def model_config(preset: str, **overrides) -> ml_collections.ConfigDict:
  """All GPTConfig fields of a preset, as a ConfigDict (so each can be overridden)."""
  cfg = GPTConfig.preset(preset, **overrides)
  fields = dataclasses.asdict(cfg)
  # Optional fields stay typed, so that the command line can set them.
  for name, kind in (("n_kv_head", int), ("ffn_dim_multiplier", float)):
    if fields[name] is None:
      fields[name] = config_dict.placeholder(kind)
  d = ml_collections.ConfigDict(fields)
  d.preset = preset  # the size (B, L, ...); "custom" for a shape of your own
  return d


def get_config(preset: str = "B") -> ml_collections.ConfigDict:
  """Every knob of the reference scripts, for a model size (B, L, XL, XXL, XXXL, 3B, tiny).

  The defaults are the NPP paper's ImageNet-256 recipe (`configs/imagenet.py:SIZE`); each
  job's keys are set by one of SECTIONS, a comment beside each key saying what it means.
  """
  c = ml_collections.ConfigDict()
  c.mode = "train"  # one of MODES: which job `python -m npp_jax.main` runs
  c.seed = 0  # initialisation, data order and dropout
  # Call jax.distributed.initialize() first (multi-host); NPP_DISTRIBUTED=1 does the same.
  c.distributed = False
  # Load .pt files that pickle objects besides tensors (they can run code): only for
  # files you trust. Released LlamaGen/NPP checkpoints load without it.
  c.trust_checkpoint = False
  # JAX's persistent compilation cache, so a restart does not recompile every stage:
  # "" = JAX_COMPILATION_CACHE_DIR if set, else WORKDIR/compile_cache; "off"; or a
  # directory (local or gs://) shared by runs.
  c.compile_cache = ""
  # Seconds one operation on a bucket may take, retries included, before the job stops with
  # one line (exit status 75) instead of waiting on storage that is gone.
  c.storage_deadline_s = 300.0

  c.model = model_config(preset)
  # The reference's `--mixed-precision bf16`: params float32, matmuls in bf16.
  c.model.dtype = "bfloat16"

  for section in SECTIONS:
    section(c, preset)
  return c


def _training_keys(c: ml_collections.ConfigDict, preset: str) -> None:
  """The data, the training loop and the optimizer."""
  del preset  # the same for every size
  c.data = ml_collections.ConfigDict()
  # A directory of ArrayRecord shards written by `mode=extract`; several, separated by
  # commas, are extractions of the same images (e.g. crop ranges 1.1 and 1.05, as the
  # reference trains) mixed per example with `weights` (default: equal).
  c.data.path = ""
  c.data.weights = ()  # odds of each extraction in data.path (default: equal)
  # Held-out token dataset for train.eval_every_steps (the embedded digits hold out 500).
  c.data.eval_path = ""
  c.data.name = "imagenet_codes"  # or "mnist": the embedded digits, built on first use
  c.data.worker_count = 0  # grain multiprocessing workers; 0 reads in the main process
  c.data.prefetch_buffer_size = 4  # batches grain prepares ahead
  c.data.cache_dir = ""  # where embedded datasets are written (default: WORKDIR/data)

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 300  # passes over the data, all NPP stages together
  c.train.global_batch_size = 256  # images per step over all devices
  c.train.patch_level = 3  # patch sides [4, 2, 1]
  c.train.epoch_rate = 0.5  # stage k ends at int(epochs * rate ** (L-1-k))
  c.train.grad_accum_steps = 1  # micro-batches per step (same result, less memory)
  c.train.ema_decay = 0.0  # 0 disables EMA
  c.train.log_every_steps = 50  # metrics.jsonl row and log line every this many steps
  c.train.ckpt_every_steps = 5000  # checkpoint every this many steps (and at stage ends)
  c.train.keep_checkpoints = 3  # newest checkpoints kept
  c.train.max_steps = -1  # stop early (for smoke runs); -1 trains the whole schedule
  # Every this many steps, the next-token loss (patch side 1) on eval_batches held-out
  # batches, comparable across stages and schedules (0: off).
  c.train.eval_every_steps = 0
  c.train.eval_batches = 4  # held-out batches per held-out loss
  c.train.init_from = ""  # orbax params directory from `python -m npp_jax.convert`
  # Memory per chip a stage's compiled step may use, in GiB: 0 = the device's own (the
  # runtime's limit, or the data sheet less 5%); a stage that needs more is refused
  # before the first step, with the overrides that fit.
  c.train.device_memory_gib = 0.0
  # (start, end): a jax.profiler trace of steps start+1..end in WORKDIR/profile; (): none.
  c.train.profile_steps = ()
  c.train.progress_bar = False  # a tqdm bar over the steps (process 0) beside the log lines

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4  # AdamW peak learning rate (per stage, after warm-up)
  c.optim.end_lr = 1e-5  # learning rate at the end of each stage's decay
  c.optim.weight_decay = 5e-2  # AdamW weight decay (on >= 2-D params only)
  c.optim.beta1 = 0.9  # AdamW beta1
  c.optim.beta2 = 0.95  # AdamW beta2
  c.optim.eps = 1e-8  # AdamW epsilon
  c.optim.grad_clip = 1.0  # global gradient-norm clip (0: off)
  c.optim.warmup_epochs = 1.0  # the reference code's default; the paper uses 5
  c.optim.decay_ratio = 0.2  # share of each stage over which the lr decays to end_lr


def _tokenizer_keys(c: ml_collections.ConfigDict, preset: str) -> None:
  """The image tokenizer and the extraction of token datasets."""
  del preset  # the same for every size
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.name = "vq"  # LlamaGen's VQ tokenizer; "grey" for the embedded demo
  c.tokenizer.preset = "VQ-16"  # or "VQ-8"
  c.tokenizer.checkpoint = ""  # vq_ds16_c2i.pt (or its converted directory)
  c.tokenizer.codebook_embed_dim = 8  # VQ codebook vector size
  # Architecture overrides of the preset (None: the preset's value); the codebook size is
  # always model.vocab_size.
  c.tokenizer.ch = config_dict.placeholder(int)
  c.tokenizer.z_channels = config_dict.placeholder(int)  # VQ latent channels (None: the preset's)
  c.tokenizer.levels = 16  # grey levels (grey tokenizer only)
  # Matmul/conv precision of the VQ tokenizer: float32 gives the reference's codes on every
  # platform; "default" lets TPUs use faster bf16 passes.
  c.tokenizer.precision = "float32"

  c.extract = ml_collections.ConfigDict()
  c.extract.source = "imagefolder"  # or "tfds" (the `data` extra)
  c.extract.data_dir = ""  # ImageFolder root (root/<class>/<image>) or the tfds data_dir
  c.extract.tfds_name = "imagenet2012"  # tfds dataset name (source tfds)
  c.extract.split = "train"  # tfds split (source tfds)
  c.extract.image_size = 256  # extract at the size you train at (grid = image_size / 16)
  c.extract.ten_crop = True  # 10 crop/flip variants per image; False: center + mirror
  c.extract.crop_range = 1.1  # ten-crop: crops of image_size from a center crop this much larger
  c.extract.out_dir = ""  # default: WORKDIR/codes
  c.extract.images_per_shard = 1024  # images per ArrayRecord shard
  # Variants per encoder step on a host; 0: 8 per local device (0.75 GiB of activations
  # each at 256 px, so extraction holds under 3 GB on a 1-device CPU host).
  c.extract.batch_size = 0
  c.extract.num_workers = 8  # image decoding threads


def _judging_keys(c: ml_collections.ConfigDict, preset: str) -> None:
  """Sampling and evaluation."""
  c.sample = ml_collections.ConfigDict()
  c.sample.checkpoint = ""  # "": newest checkpoint of --workdir; or converted dir / .pt file
  c.sample.use_ema = True  # sample from EMA weights when the run kept them
  # "mixed": params and residual float32, matmuls in model.dtype (as in training);
  # "bfloat16": the whole GPT in bf16, as the reference's sampling script (published FIDs).
  c.sample.precision = "mixed"
  # Layers per iteration of the decoder's layer scan (model.scan_unroll is for training):
  # rolled (1) was faster on the CPU; the accelerator benchmark measures unrolled too.
  c.sample.scan_unroll = 1
  c.sample.cfg_scale = CFG_SCALES.get(preset, 1.5)  # classifier-free guidance (1.0: off)
  c.sample.cfg_interval = -1  # guide only the first this many tokens (-1: all)
  c.sample.temperature = 1.0  # softmax temperature
  c.sample.top_k = 0  # sample among the k likeliest tokens (0: all)
  c.sample.top_p = 1.0  # nucleus sampling mass (1.0: off)
  c.sample.num_images = 50_000  # the ADM evaluator's FID-50k
  c.sample.batch_size = 128  # global; a multiple of the device count
  c.sample.seed = 0  # sampling randomness and the drawn labels
  c.sample.png_classes = ()  # classes shown in samples.png (default: the first 10)
  c.sample.png_per_class = 8  # images per row of samples.png
  c.sample.png_scale = 1  # pixel scale of samples.png

  c.eval = ml_collections.ConfigDict()
  c.eval.kind = "inception"  # "mnist_classifier" for the embedded demo
  c.eval.samples = ""  # sample batch .npz (default: newest WORKDIR/samples/samples_*.npz)
  c.eval.reference = ""  # ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz
  c.eval.inception_checkpoint = ""  # pt_inception-2015-12-05-6726825d.pth (given by path)
  c.eval.preprocess = "adm"  # "adm" reproduces the published numbers; or "pytorch_fid"
  # Images per Inception step on a host: 128 needs about 1 GiB of activations at 299 px
  # (500, the reference's, took 3.9 GiB on the CPU backend and more with the runtime).
  c.eval.batch_size = 128
  c.eval.is_split_size = 5000  # images per Inception Score split (ADM: 5000)
  c.eval.judge_cache = ""  # the digit judge's weights (default: WORKDIR/classifier.npz)

  # `python -m npp_jax.study`: the schedules (1 = next-token prediction) and seeds it
  # trains on the same data and epochs, and when their samples are judged.


def _study_keys(c: ml_collections.ConfigDict, preset: str) -> None:
  """The NPP-versus-NTP study."""
  del preset  # the same for every size
  c.study = ml_collections.ConfigDict()
  c.study.patch_levels = (1, 2, 3)  # schedules compared (1: next-token prediction)
  c.study.epoch_rate = 0.5  # NPP stage-end rate of the study's schedules
  c.study.seeds = (0, 1)  # seeds per schedule
  c.study.num_images = 200  # samples judged at each quality point
  # Quality points per run, spread evenly over its epochs; every stage end is added.
  c.study.quality_points = 6
  # Adds NTP trained for the FLOPs NPP at this patch level spends (0: no such runs).
  c.study.flops_matched_level = 0
  # Folder of the finished runs' records (default: WORKDIR/records); a run with a record is
  # not trained again.
  c.study.records = ""
  c.study.train = True  # False: train nothing, summarize the runs that have records


def _mesh_keys(c: ml_collections.ConfigDict, preset: str) -> None:
  """How devices are laid out."""
  c.mesh = ml_collections.ConfigDict()
  # Devices the batch is split over; -1: all devices not used by the other axes.
  c.mesh.data = 1 if preset in FSDP_PRESETS else -1
  # Devices the parameters and optimizer state are split over: from XL up the train state
  # (float32 params and Adam moments, 12 bytes a parameter) is split over every chip, so
  # it fits chips that cannot hold it whole (checked with aot).
  c.mesh.fsdp = -1 if preset in FSDP_PRESETS else 1
  c.mesh.tensor = 1  # devices heads, MLP and vocabulary are split over


# The sections of get_config after the run-wide keys and the model, in order.
SECTIONS = (_training_keys, _tokenizer_keys, _judging_keys, _study_keys, _mesh_keys)


def preset_of(cfg: GPTConfig) -> str | None:
  """The preset whose shape (dim, n_layer, n_head) `cfg` has, or None."""
  return next(
    (name for name, p in PRESETS.items() if all(getattr(cfg, f) == p[f] for f in _SHAPE_FIELDS)),
    None,
  )


def gpt_config(c: ml_collections.ConfigDict) -> GPTConfig:
  """The GPTConfig described by `c.model`.

  `model.preset` must agree with the shape, so that `--config.model.preset=L` on a GPT-B
  config is an error rather than a GPT-B labelled L; `custom` accepts any shape.
  """
  fields = {f.name for f in dataclasses.fields(GPTConfig)}
  unknown = sorted(set(c.model.keys()) - fields - {"preset"})
  if unknown:
    raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(fields)}.")
  cfg = GPTConfig(**{k: v for k, v in c.model.to_dict().items() if k in fields})
  name = c.model.preset
  if name != CUSTOM:
    key = name.upper().removeprefix("GPT-") if name.lower() != "tiny" else "tiny"
    if key not in PRESETS:
      raise ValueError(
        f"config.model.preset={name!r} is not a model size; use one of {sorted(PRESETS)} "
        f"or {CUSTOM!r}."
      )
    if any(getattr(cfg, f) != PRESETS[key][f] for f in _SHAPE_FIELDS):
      shape = ", ".join(f"{f}={getattr(cfg, f)}" for f in _SHAPE_FIELDS)
      raise ValueError(
        f"config.model.preset={name!r} but the model has {shape}; use the config file of "
        f"that size (configs/{key.lower()}.py) or --config.model.preset={CUSTOM} for a "
        "shape of your own."
      )
  return cfg


def train_gpt_config(c: ml_collections.ConfigDict) -> GPTConfig:
  """The GPTConfig to train: with stochastic depth the reference (`train_c2i.py`) turns
  residual and FFN dropout off, and so does npp_jax."""
  cfg = gpt_config(c)
  if cfg.drop_path_rate > 0 and (cfg.resid_dropout_p > 0 or cfg.ffn_dropout_p > 0):
    log.info(
      "model.drop_path_rate=%s: residual and FFN dropout are off (as in the reference).",
      cfg.drop_path_rate,
    )
    cfg = dataclasses.replace(cfg, resid_dropout_p=0.0, ffn_dropout_p=0.0)
  return cfg


def check_profile_steps(steps) -> None:
  """A one-line ValueError unless `steps` is () or (start, end) with 0 <= start < end."""
  steps = tuple(steps)
  if steps and (len(steps) != 2 or not 0 <= steps[0] < steps[1]):
    raise ValueError(
      f"config.train.profile_steps={steps}: use (start, end) with 0 <= start < end, e.g. "
      "(100, 105) traces steps 101-105, or () for no trace."
    )


def check_training(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """One-line errors for settings that would train wrongly or fail late; compiles nothing.
  With `num_devices`, also how the batch splits over the mesh on that many devices."""
  t, o = c.train, c.optim
  for name in ("epochs", "log_every_steps", "ckpt_every_steps", "keep_checkpoints", "eval_batches"):
    if t[name] < 1:
      raise ValueError(f"config.train.{name}={t[name]} must be >= 1.")
  if t.eval_every_steps < 0:
    raise ValueError(f"config.train.eval_every_steps={t.eval_every_steps} must be >= 0 (0: off).")
  check_profile_steps(t.profile_steps)
  if t.eval_every_steps and c.data.name != "mnist" and not c.data.eval_path:
    raise ValueError(
      "config.train.eval_every_steps needs held-out data: set config.data.eval_path to "
      "codes extracted from a split you do not train on (e.g. --config.extract.split=validation)."
    )
  if not o.lr > 0:
    raise ValueError(f"config.optim.lr={o.lr} must be > 0.")
  for name in ("end_lr", "weight_decay", "warmup_epochs", "grad_clip", "eps"):
    if o[name] < 0:
      raise ValueError(f"config.optim.{name}={o[name]} must be >= 0.")
  for name in ("beta1", "beta2"):
    if not 0 <= o[name] < 1:
      raise ValueError(f"config.optim.{name}={o[name]} must be in [0, 1).")
  if c.model.dtype == "float16":
    raise ValueError(
      "config.model.dtype=float16 would train without loss scaling (gradients underflow); "
      "train in bfloat16 or float32 (float16 is fine for sampling)."
    )
  if not 0.0 <= t.ema_decay < 1.0:
    raise ValueError(f"train.ema_decay={t.ema_decay} must be in [0, 1).")
  for s in npp.patch_sides(t.patch_level):
    if c.model.grid % s:
      raise ValueError(
        f"train.patch_level={t.patch_level} needs patch side {s}, which does not divide "
        f"the {c.model.grid}x{c.model.grid} token grid; lower train.patch_level."
      )
  npp.stage_boundaries(t.epochs, t.patch_level, t.epoch_rate)  # every stage gets epochs
  if num_devices is not None:
    _check_batch_split(c, num_devices)
  check_tokenizer(c)


def _check_batch_split(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """The global batch and its micro-batches split evenly over the data-parallel devices."""
  mesh_shape = sharding.mesh_shape(c.mesh.to_dict(), num_devices)
  dp = mesh_shape[0] * mesh_shape[1]
  gb, k = c.train.global_batch_size, c.train.grad_accum_steps
  if gb < 1:
    raise ValueError(f"train.global_batch_size={gb} must be >= 1.")
  if gb % dp:
    raise ValueError(
      f"train.global_batch_size={gb} is not divisible by the {dp} data-parallel devices "
      f"(mesh data x fsdp = {mesh_shape[0]} x {mesh_shape[1]}); use a multiple of {dp}."
    )
  if k < 1:
    raise ValueError(f"train.grad_accum_steps={k} must be >= 1 (1: no accumulation).")
  if (gb // dp) % k:
    raise ValueError(
      f"train.grad_accum_steps={k} must divide the per-device batch {gb // dp} "
      f"(global {gb} over {dp} devices)."
    )


def check_sampling(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """Every bad `config.sample` value is a one-line ValueError, before anything compiles."""
  s = c.sample
  for name in ("batch_size", "png_per_class", "png_scale"):
    if s[name] < 1:
      raise ValueError(f"config.sample.{name}={s[name]} must be >= 1.")
  if s.num_images < 0:
    raise ValueError(f"config.sample.num_images={s.num_images} must be >= 0 (0: the grid only).")
  if s.batch_size % num_devices:
    raise ValueError(
      f"config.sample.batch_size={s.batch_size} must be a multiple of the {num_devices} "
      "data-parallel devices."
    )


def check_eval(c: ml_collections.ConfigDict) -> None:
  """The judge `config.eval` names, and for FID the files it needs."""
  e = c.eval
  if e.kind not in EVAL_KINDS:
    raise ValueError(f"config.eval.kind={e.kind!r}; use one of {EVAL_KINDS}.")
  if e.kind != "inception":
    return
  if not e.reference:
    raise ValueError(
      "config.eval.reference is empty: give the ADM reference batch "
      "(VIRTUAL_imagenet256_labeled.npz; where to get it: README, 'Files from outside') or "
      "an npz of reference images `arr_0`."
    )
  if not e.inception_checkpoint:
    raise ValueError(
      "config.eval.inception_checkpoint is empty: give pytorch-fid's "
      "pt_inception-2015-12-05-6726825d.pth (never downloaded at run time; where to get it: "
      "README, 'Files from outside')."
    )


def check_tokenizer(c: ml_collections.ConfigDict) -> None:
  """The tokenizer a config names must exist and fit the model's vocabulary."""
  t = c.tokenizer
  if t.name not in TOKENIZERS:
    raise ValueError(f"config.tokenizer.name={t.name!r}; use one of {TOKENIZERS}.")
  if t.name == "grey" and t.levels != c.model.vocab_size:
    raise ValueError(
      f"config.tokenizer.levels={t.levels} but config.model.vocab_size="
      f"{c.model.vocab_size}: the grey-level tokenizer has one token per level; make them equal."
    )
  if t.name == "vq":
    vq_config(c)  # an unknown preset or a bad width fails here
    if t.precision not in PRECISIONS:
      raise ValueError(f"config.tokenizer.precision={t.precision!r}; use one of {PRECISIONS}.")


def vq_config(c: ml_collections.ConfigDict) -> VQConfig:
  """The VQConfig of `c.tokenizer`; its codebook has `c.model.vocab_size` codes."""
  t = c.tokenizer
  if t.preset not in VQ_PRESETS:
    raise ValueError(f"config.tokenizer.preset={t.preset!r}; use one of {sorted(VQ_PRESETS)}.")
  overrides = {k: t[k] for k in ("ch", "z_channels") if t[k] is not None}
  return VQConfig.preset(
    t.preset,
    codebook_size=c.model.vocab_size,
    codebook_embed_dim=t.codebook_embed_dim,
    **overrides,
  )


SAMPLE_PRECISIONS = ("mixed", "bfloat16")


def sampling_gpt_config(c: ml_collections.ConfigDict) -> GPTConfig:
  """The GPTConfig to sample with, per `config.sample.precision` and `sample.scan_unroll`
  (the training unroll does not carry over: unrolled, GPT-B's CPU token step went from 70
  to 99 ms)."""
  if not isinstance(c.sample.scan_unroll, int) or c.sample.scan_unroll < 1:
    raise ValueError(f"config.sample.scan_unroll={c.sample.scan_unroll!r} must be an int >= 1.")
  cfg = dataclasses.replace(gpt_config(c), scan_unroll=c.sample.scan_unroll)
  if c.sample.precision not in SAMPLE_PRECISIONS:
    raise ValueError(
      f"config.sample.precision={c.sample.precision!r}; use one of {SAMPLE_PRECISIONS}."
    )
  if c.sample.precision == "bfloat16":
    cfg = dataclasses.replace(
      cfg, dtype="bfloat16", param_dtype="bfloat16", residual_dtype="bfloat16"
    )
  return cfg


def check_study(c: ml_collections.ConfigDict) -> None:
  """The study's schedules, seeds and per-run settings, checked before anything trains."""
  st = c.study
  if not st.patch_levels or not st.seeds:
    raise ValueError("config.study.patch_levels and config.study.seeds must not be empty.")
  if st.num_images < 1:
    raise ValueError(f"config.study.num_images={st.num_images} must be >= 1.")
  if st.quality_points < 1:
    raise ValueError(f"config.study.quality_points={st.quality_points} must be >= 1.")
  if st.flops_matched_level and (
    st.flops_matched_level < 2 or st.flops_matched_level not in st.patch_levels
  ):
    raise ValueError(
      f"config.study.flops_matched_level={st.flops_matched_level} is not one of the study's NPP "
      f"patch_levels {tuple(st.patch_levels)}: use one of them, or 0 for no FLOP-matched runs."
    )
  if not c.train.eval_every_steps:
    raise ValueError("config.train.eval_every_steps must be > 0: the study compares held-out loss.")
  for level in st.patch_levels:  # each run's own training settings
    run = copy.deepcopy(c)
    run.train.update(patch_level=level, epoch_rate=st.epoch_rate)
    check_training(run)


def check_mode(c: ml_collections.ConfigDict) -> None:
  """A one-line error for an unknown `config.mode`."""
  if c.mode not in MODES:
    raise ValueError(f"config.mode={c.mode!r}; choose one of {MODES}.")


def _comments(source: str, pattern: str) -> dict[str, str]:
  """{key: its comment} for the assignments `pattern` matches in `source`: the comment
  at the end of the line, else the comment lines right above it."""
  out, above = {}, []
  for line in source.splitlines():
    text = line.strip()
    if text.startswith("#"):
      above.append(text.lstrip("# "))
      continue
    if m := re.match(pattern, text):
      comment = text.split("  # ", 1)[1] if "  # " in text else " ".join(above)
      if comment:
        out[m.group(1)] = comment
    above = []
  return out


def key_meanings() -> dict[str, str]:
  """Every config key's meaning, from the comments of `get_config` and of GPTConfig's
  fields (stated once, beside the default)."""
  out = {
    f"model.{k}": v for k, v in _comments(inspect.getsource(GPTConfig), r"(\w+): [^=]+=").items()
  }
  out["model.preset"] = _comments(inspect.getsource(model_config), r"d\.(preset) = ")["preset"]
  for builder in (get_config, *SECTIONS):
    out |= _comments(inspect.getsource(builder), r"c\.([\w.]+) = ")
  return out


def describe(config: ml_collections.ConfigDict) -> str:
  """Every key of `c` with its value and meaning, one per line (`--print_config`)."""
  meanings = key_meanings()
  values = _flatten(json.loads(config.to_json_best_effort()))
  lines = []
  for key, value in values.items():
    meaning = meanings.get(key, "")
    first = re.split(r"(?<!e\.g)(?<!i\.e)[.;]\s", meaning, maxsplit=1)[0].rstrip(".")
    lines.append(f"{key} = {value!r}" + (f"  # {first}" if first else ""))
  return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
  return out
