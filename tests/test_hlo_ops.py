"""Reading a compiled program's operations, and RMSNorm/RoPE inside fusions in the train step."""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

from npp_jax import train_step
from npp_jax.accelerators import hlo_ops
from npp_jax.models.gpt import GPTConfig

# A hand-written module in the shapes GPU programs take: a fusion, an unfused multiply, a
# command buffer (a `call` wrapping a Triton GEMM fusion and a cuBLAS call), a loop, a
# conditional, an all-reduce whose reducer is not an op of its own, an asynchronous
# all-gather (counted once) and an asynchronous copy; tuple types with nested parentheses
# and comments in operand lists.
MODULE = """HloModule m, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p), metadata={op_name="jit(f)/inside"}
}

%triton_gemm (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %d = f32[4]{0} dot(%p, %p), lhs_contracting_dims={0}, rhs_contracting_dims={0}
}

%command_buffer (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %g = f32[4]{0} fusion(%x), kind=kCustom, calls=%triton_gemm
  %c = (f32[4]{0}, s8[16]{0}) custom-call(%g), custom_call_target="__cublas$gemm"
  ROOT %y = f32[4]{0} get-tuple-element(%c), index=0
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[4]{0} get-tuple-element(%t), index=1
  %y = f32[4]{0} call(%x), to_apply=%command_buffer
  %r = f32[4]{0} all-reduce(%y), replica_groups={}, to_apply=%add
  ROOT %o = (s32[], f32[4]{0}) tuple(%i, /*index=1*/%r)
}

%cond (t: (s32[], f32[4])) -> pred[] {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %k = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %k), direction=LT
}

%on_true (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %e = f32[4]{0} exponential(%x)
}

%on_false (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %c = f32[4]{0} copy(%x)
}

%wrapped (x: f32[4]) -> f32[32] {
  %x = f32[4]{0} parameter(0)
  ROOT %ag = f32[32]{0} all-gather(%x), dimensions={0}
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %f = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused_computation
  %m = f32[4]{0} multiply(%f, %f), metadata={op_name="jit(f)/layers/ffn_norm/mul"}
  %z = s32[] constant(0)
  %t = (s32[], f32[4]{0}) tuple(%z, %m)
  %w = (s32[], f32[4]{0}) while(%t), condition=%cond, body=%body
  %o = f32[4]{0} get-tuple-element(%w), index=1
  %p = pred[] constant(true)
  %b = f32[4]{0} conditional(%p, %o, %o), true_computation=%on_true, false_computation=%on_false
  %s = ((f32[4]{0}), f32[32]{0}) async-start(%b), calls=%wrapped
  %d = f32[32]{0} async-done(%s)
  %cs = (f32[4]{0}, f32[4]{0}, u32[]) copy-start(%b)
  %cd = f32[4]{0} copy-done(%cs)
  ROOT %r = f32[4]{0} slice(%d), slice={[0:4]}
}
"""


def test_counts_and_names_of_a_hand_written_module():
  ops = hlo_ops.top_level_ops(MODULE)
  assert sorted((op.opcode, op.kind) for op in ops) == sorted(
    [
      ("fusion", "fusion"),
      ("multiply", "other"),
      ("copy-start", "copy"),
      ("slice", "other"),
      ("compare", "other"),  # the loop condition runs too
      ("fusion", "library"),  # the Triton GEMM inside the command buffer
      ("custom-call", "library"),
      ("all-reduce", "collective"),  # its reducer %add is not an op of its own
      ("exponential", "other"),
      ("copy", "copy"),
      ("all-gather", "collective"),  # inside async-start, once
    ]
  )
  assert [op.op_name for op in ops if op.opcode == "multiply"] == ["jit(f)/layers/ffn_norm/mul"]
  assert hlo_ops.op_counts(MODULE) == {
    "fusion": 1,
    "library": 2,
    "collective": 2,
    "copy": 2,
    "other": 4,
  }
  with pytest.raises(ValueError, match="ENTRY"):
    hlo_ops.top_level_ops("HloModule empty")


def _compiled_train_step(cfg: GPTConfig) -> str:
  tx = optax.adamw(1e-3)
  init = functools.partial(train_step.init_state, cfg, tx, ema=False)
  state = jax.jit(lambda k: train_step.unboxed(init(k)))(jax.random.key(0))
  batch = {"tokens": jnp.zeros((8, cfg.seq_len), jnp.int32), "label": jnp.zeros((8,), jnp.int32)}
  step = functools.partial(
    train_step.train_step,
    cfg=cfg,
    tx=tx,
    schedule=lambda s: 1e-3,
    root_key=jax.random.key(1),
    patch_side=1,
  )
  # XLA's default CPU options, whatever XLA_FLAGS the test-suite compiles with (conftest.py).
  defaults = {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": True}
  return jax.jit(step).lower(state, batch).compile(compiler_options=defaults).as_text()


def test_rmsnorm_and_rope_run_inside_fusions():
  """Every RMSNorm and RoPE operation of the compiled bf16 train step (forward and
  backward) sits inside a fusion: none is left as its own pass over memory."""
  text = _compiled_train_step(GPTConfig.preset("tiny"))
  ops = hlo_ops.top_level_ops(text)
  for scope in ("attention_norm/", "ffn_norm/", "rope/"):
    mine = [op for op in ops if scope in op.op_name]
    assert mine, f"no operation named {scope} in the compiled step"
    # A fusion of either kind: XLA:CPU fuses the norm into its matmul's custom fusion.
    assert {op.opcode for op in mine} == {"fusion"}, [op for op in mine if op.opcode != "fusion"]
  # On the CPU nothing at all is left outside fusions but loop-carried copies.
  assert hlo_ops.op_counts(text)["other"] == 0


# A windowed einsum as the TPU compiler writes it: a ring of 4 chips walked in both
# directions, unrolled by two, so the counter goes 0, 2 (`i += 2` while i < 4): two trips,
# each a dot and a collective-permute whose async tuple ends in two u32 context words.
WINDOWED = """HloModule windowed

%cond (p: (s32[], f32[8,16], f32[16,32])) -> pred[] {
  %p = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8,16], f32[16,32])) -> (s32[], f32[8,16], f32[16,32]) {
  %p = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,32]{1,0} get-tuple-element(%p), index=2
  %cps = (f32[16,32]{1,0}, f32[16,32]{1,0}, u32[], u32[]) collective-permute-start(%w), channel_id=1, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %cpd = f32[16,32]{1,0} collective-permute-done(%cps)
  %y = f32[8,32]{1,0} dot(%x, %cpd), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = s32[] constant(2)
  %next = s32[] add(%i, %two)
  ROOT %t = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) tuple(%next, %x, %cpd)
}

ENTRY %main (x: f32[8,16], w: f32[16,32]) -> f32[16,32] {
  %x = f32[8,16]{1,0} parameter(0)
  %w = f32[16,32]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %t = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) tuple(%zero, %x, %w)
  %loop = (s32[], f32[8,16]{1,0}, f32[16,32]{1,0}) while(%t), condition=%cond, body=%body
  ROOT %out = f32[16,32]{1,0} get-tuple-element(%loop), index=2
}
"""  # noqa: E501 (HLO lines as the compiler writes them)


def test_a_loop_counting_by_two_and_an_async_permute():
  cost = hlo_ops.program_cost(WINDOWED)
  assert cost.loops == [("loop", 2)]
  assert cost.matmul_flops == 2 * (2 * 8 * 32 * 16)
  assert cost.collective_summary() == {
    "collective-permute": {"count": 2, "bytes": 2 * 16 * 32 * 4, "dtypes": ["f32"]}
  }
  # The counter's step changed to 1: four trips.
  cost = hlo_ops.program_cost(WINDOWED.replace("constant(2)", "constant(1)"))
  assert cost.loops == [("loop", 4)] and cost.matmul_flops == 4 * (2 * 8 * 32 * 16)
