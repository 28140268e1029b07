"""GPTConfig: the hyper-parameters of the LlamaGen class-conditional transformer, and presets."""

import dataclasses
from typing import Any

import jax.numpy as jnp

# (n_layer, n_head, dim) of LlamaGen's class-conditional models (autoregressive/models/gpt.py).
PRESETS: dict[str, dict[str, Any]] = {
  "B": dict(n_layer=12, n_head=12, dim=768),
  "L": dict(n_layer=24, n_head=16, dim=1024),
  "XL": dict(n_layer=36, n_head=20, dim=1280),
  "XXL": dict(n_layer=48, n_head=24, dim=1536),
  "XXXL": dict(n_layer=48, n_head=40, dim=2560),
  "3B": dict(n_layer=24, n_head=32, dim=3200),
  # The golden-file model of the test-suite (vocab 64, 10 classes, 8x8 grid).
  "tiny": dict(n_layer=2, n_head=4, dim=64, vocab_size=64, num_classes=10, grid=8),
}

_DTYPES = ("float32", "bfloat16", "float16")


def find_multiple(n: int, k: int) -> int:
  """Smallest multiple of k that is >= n."""
  return n if n % k == 0 else n + k - (n % k)


def _fixed(default: Any) -> Any:
  """A field the trained weights fix: a checkpoint is continued, and a run's weights are
  sampled, only with the value they were trained with."""
  return dataclasses.field(default=default, metadata={"fixed": True})


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """LlamaGen `ModelArgs` for class-conditional generation, plus compute settings.

  Dropout defaults follow the reference training recipe; pass zeros for scoring.
  `dtype` is the activation/matmul dtype, `param_dtype` the storage dtype of params.
  """

  dim: int = _fixed(768)  # width of the residual stream
  n_layer: int = _fixed(12)  # transformer blocks
  n_head: int = _fixed(12)  # attention heads (head size dim / n_head)
  n_kv_head: int | None = _fixed(None)  # key/value heads for grouped-query attention (None: n_head)
  vocab_size: int = _fixed(16384)  # tokenizer codebook size (VQ-16: 16384)
  num_classes: int = _fixed(1000)  # class labels (the null class for guidance is one more)
  grid: int = _fixed(16)  # tokens per image side (256 px / VQ-16 = 16)
  cls_token_num: int = 1  # class-condition tokens before the image tokens
  multiple_of: int = _fixed(256)  # SwiGLU hidden width is rounded up to a multiple of this
  ffn_dim_multiplier: float | None = _fixed(None)  # scales the SwiGLU hidden width (None: 8/3 dim)
  norm_eps: float = 1e-5  # RMSNorm epsilon
  rope_base: float = 10000.0  # 2D rotary embedding base
  class_dropout_prob: float = _fixed(0.1)  # labels dropped to the null class (for guidance)
  token_dropout_p: float = 0.1  # dropout on the token embeddings
  resid_dropout_p: float = 0.1  # dropout on each block's attention output
  ffn_dropout_p: float = 0.1  # dropout on each block's MLP output
  attn_dropout_p: float = 0.0  # dropout on the attention weights
  drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this over the blocks
  dtype: str = "bfloat16"  # matmul/activation dtype
  param_dtype: str = "float32"  # storage dtype of the parameters
  # The residual stream between blocks: float32 (default), or the compute dtype for a
  # model run wholly in bf16 (the reference's sampling script).
  residual_dtype: str = "float32"
  # Rematerialise each block in the backward pass: "none", "full" or "dots" (save matmuls).
  remat: str = "none"
  # Attention kernel of `jax.nn.dot_product_attention`: "xla" (portable) or "cudnn" (the
  # fused flash kernel on NVIDIA GPUs).
  attention: str = "xla"
  # Layers per iteration of the layer scan: 1 compiles one block whatever the depth;
  # n_layer unrolls them all (faster steps for small models, longer compiles).
  scan_unroll: int = 1
  # The dtype of the matmul weights' gradients, in which they are summed over the batch
  # and reduced across chips: float32 (the reference's DDP reduces float32 gradients),
  # or `dtype` (each weight cast once per step, gradients reduced in bf16).
  grad_dtype: str = "float32"

  def __post_init__(self):
    problems = []
    for name in (
      "dim",
      "n_layer",
      "n_head",
      "vocab_size",
      "num_classes",
      "grid",
      "cls_token_num",
      "multiple_of",
    ):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        problems.append(f"{name}={getattr(self, name)!r} must be a positive int")
    if not problems:
      if self.dim % self.n_head:
        problems.append(f"dim={self.dim} is not divisible by n_head={self.n_head}")
      elif self.head_dim % 4:
        problems.append(f"head_dim={self.head_dim} (dim/n_head) must be divisible by 4 for 2D RoPE")
      if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
        problems.append(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
      if self.cls_token_num != 1:
        problems.append(f"cls_token_num={self.cls_token_num}: class-conditional models use 1")
    for name in (
      "class_dropout_prob",
      "token_dropout_p",
      "resid_dropout_p",
      "ffn_dropout_p",
      "attn_dropout_p",
      "drop_path_rate",
    ):
      if not 0.0 <= getattr(self, name) < 1.0:
        problems.append(f"{name}={getattr(self, name)!r} must be in [0, 1)")
    for name in ("dtype", "param_dtype", "residual_dtype", "grad_dtype"):
      if getattr(self, name) not in _DTYPES:
        problems.append(f"{name}={getattr(self, name)!r} must be one of {_DTYPES}")
    if self.remat not in ("none", "full", "dots"):
      problems.append(f"remat={self.remat!r} must be 'none', 'full' or 'dots'")
    if self.attention not in ("xla", "cudnn"):
      problems.append(f"attention={self.attention!r} must be 'xla' or 'cudnn'")
    elif self.attention == "cudnn" and not problems:
      # cuDNN's fused kernel takes 16-bit inputs and head dims that are multiples of 8
      # (at most 128 before Hopper, 256 from Hopper on; JAX checks that on the device).
      if self.dtype not in ("bfloat16", "float16"):
        problems.append(f"attention='cudnn' needs dtype bfloat16 or float16, not {self.dtype!r}")
      if self.head_dim % 8:
        problems.append(
          f"attention='cudnn' needs head_dim (dim/n_head) a multiple of 8, got {self.head_dim}"
        )
    if not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
      problems.append(f"scan_unroll={self.scan_unroll!r} must be a positive int")
    if problems:
      raise ValueError("invalid GPTConfig: " + "; ".join(problems) + ".")

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "GPTConfig":
    """A named LlamaGen size (B, L, XL, XXL, XXXL, 3B, tiny) with optional overrides."""
    key = name.upper().removeprefix("GPT-") if name.lower() != "tiny" else "tiny"
    if key not in PRESETS:
      raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
    return cls(**{**PRESETS[key], **overrides})

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_head

  @property
  def kv_heads(self) -> int:
    return self.n_kv_head if self.n_kv_head is not None else self.n_head

  @property
  def ffn_hidden(self) -> int:
    hidden = int(2 * (4 * self.dim) / 3)
    if self.ffn_dim_multiplier is not None:
      hidden = int(self.ffn_dim_multiplier * hidden)
    return find_multiple(hidden, self.multiple_of)

  @property
  def seq_len(self) -> int:
    """Image tokens per image (grid * grid)."""
    return self.grid * self.grid

  @property
  def has_null_class(self) -> bool:
    """Whether the class table has the extra null row used by classifier-free guidance."""
    return self.class_dropout_prob > 0

  @property
  def class_rows(self) -> int:
    return self.num_classes + int(self.has_null_class)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def residual(self) -> jnp.dtype:
    return jnp.dtype(self.residual_dtype)

  @property
  def storage_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# The fields marked `_fixed` above: what a checkpoint's weights are.
FIXED_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.metadata.get("fixed"))
