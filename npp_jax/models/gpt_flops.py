"""What a GPT step costs in floating-point operations, counted from the config.

Model FLOPs, the usual accounting: each multiply-add of a matmul is 2 FLOPs; a train step
is the forward pass plus a backward pass of twice its cost (rematerialisation is not
counted); attention counts its full score and value matmuls (as computed here, causal
masking included). Embedding lookups, patch averaging, norms and softmaxes are left out:
they are a small share and not matmuls.
"""

from npp_jax.models.gpt_config import GPTConfig


def matmul_params_per_token(cfg: GPTConfig) -> int:
  """Weights every token multiplies through: attention and FFN projections of all layers
  plus the output head."""
  qkv = cfg.dim * (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
  out = cfg.n_head * cfg.head_dim * cfg.dim
  ffn = 3 * cfg.dim * cfg.ffn_hidden
  return cfg.n_layer * (qkv + out + ffn) + cfg.dim * cfg.vocab_size


def forward_flops(cfg: GPTConfig, seq: int, context: int | None = None) -> int:
  """FLOPs of one sequence of `seq` positions attending over `context` keys (default seq)."""
  context = seq if context is None else context
  dense = 2 * seq * matmul_params_per_token(cfg)
  attention = cfg.n_layer * 2 * 2 * seq * context * cfg.n_head * cfg.head_dim  # scores + values
  return dense + attention


def train_seq_len(cfg: GPTConfig, patch_side: int) -> int:
  """Positions of the training input at patch side s: [class] + (grid/s)^2 - 1 patches."""
  return (cfg.grid // patch_side) ** 2


def train_step_flops(cfg: GPTConfig, patch_side: int, batch: int) -> int:
  """FLOPs of one optimizer step on `batch` sequences at `patch_side` (forward + backward)."""
  return 3 * batch * forward_flops(cfg, train_seq_len(cfg, patch_side))


def decode_step_flops(cfg: GPTConfig, batch: int, context: int | None = None) -> int:
  """FLOPs of one KV-cache decoding step for `batch` rows; the cache holds `context` keys
  (default: the whole cache, class token and all image tokens, which is what is computed)."""
  context = cfg.cls_token_num + cfg.seq_len if context is None else context
  return batch * forward_flops(cfg, 1, context)
