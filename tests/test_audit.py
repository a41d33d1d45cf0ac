"""The precision audit reads what XLA compiled: a tiny GPT's train step under bf16 and fp8 rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.app.config import RunConfig, load_precision
from hybrid_jax.app.run import build
from hybrid_jax.diagnostics import (
    audit,
    audit_step,
    expected_from_plan,
    hlo_dots,
    layer_of,
)
from hybrid_jax.precision import plan

_FP8_MLP = '{"rules": [["mlp/", "fp8-mixed"]], "default": "bf16-mixed"}'
_LAYERS = ("blocks/0/attn/qkv", "blocks/0/attn/proj", "blocks/0/mlp/fc", "blocks/0/mlp/proj")
_LAYERS += ("tok_embed",)
BF16, E4M3, E5M2 = np.dtype(jnp.bfloat16), np.dtype(jnp.float8_e4m3fn), np.dtype(jnp.float8_e5m2)


def _step(precision: str, optimizer: str):
    """The tiny GPT's compiled train step and the plan its precision string gives."""
    config = RunConfig(
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=16,
        batch_size=4,
        optimizer=optimizer,
        precision=precision,
    )
    run = build(config)
    batch = run.sample_train(run.data_key)
    compiled = run.step.lower(run.state, batch).compile()
    return compiled, plan(run.state.params, load_precision(precision)), run, batch


@pytest.fixture(scope="module")
def bf16_step():
    # Muon's Newton-Schulz products are in this step too: the audit must tell them from layers.
    return _step("bf16-mixed", "muon_adamw")


@pytest.fixture(scope="module")
def fp8_step():
    return _step(_FP8_MLP, "adamw")


def _rows(table):
    return [dict(zip(table.columns, row, strict=True)) for row in table.rows]


def test_bf16_mixed_step_runs_every_layer_in_bf16(bf16_step):
    compiled, step_plan, _, _ = bf16_step
    expected = expected_from_plan(step_plan)
    assert expected == {layer: BF16 for layer in (*_LAYERS, "pos_embed")}
    table = audit(compiled, expected)
    rows = _rows(table)
    # Each layer: one forward dot and two backward ones (input and weight gradients).
    for layer in _LAYERS:
        passes = sorted(r["pass"] for r in rows if r["layer"] == layer)
        assert passes == ["backward", "backward", "forward"], layer
    forward = [r for r in rows if r["pass"] == "forward" and r["layer"] != "-"]
    assert {r["layer"] for r in forward} == set(_LAYERS)
    # XLA:CPU has no bf16 GEMM: the dot reads f32 converted from bf16, accumulating in f32.
    assert {(r["operands"], r["source"], r["result"], r["expected"]) for r in forward} == {
        ("f32 x f32", "bf16 x bf16", "f32", "bf16")
    }
    # Attention's two products per pass have no layer and are listed, never flagged.
    assert len([r for r in rows if r["layer"] == "-"]) == 6
    assert not any(table.column("mismatch"))
    assert table.footer[-1][-1] == 0
    assert table.footer[0][:2] == ("no dot", "pos_embed")  # only looked up, never multiplied


def test_fp8_mlp_rule_reaches_the_mlp_dots(fp8_step):
    compiled, step_plan, _, _ = fp8_step
    expected = expected_from_plan(step_plan)
    assert expected["blocks/0/mlp/fc"] == expected["blocks/0/mlp/proj"] == E4M3
    assert expected["blocks/0/attn/qkv"] == BF16
    dots = hlo_dots(compiled, layers=expected)
    for layer in ("blocks/0/mlp/fc", "blocks/0/mlp/proj"):
        [forward] = [d for d in dots if d.layer == layer and d.pass_ == "forward"]
        assert forward.source_dtypes == (E4M3, E4M3)
        assert forward.computes_in("e4m3") and not forward.computes_in("bf16")
        # The backward dots multiply e5m2 gradients by the e4m3 operands kept from the forward.
        backward = [d for d in dots if d.layer == layer and d.pass_ == "backward"]
        names = sorted(sorted(s.name for s in d.source_dtypes) for d in backward)
        assert names == [["float8_e4m3fn", "float8_e5m2"]] * 2
    [qkv] = [d for d in dots if d.layer == "blocks/0/attn/qkv" and d.pass_ == "forward"]
    assert qkv.source_dtypes == (BF16, BF16)
    table = audit(compiled, expected)
    assert not any(table.column("mismatch"))
    mlp = [r for r in _rows(table) if r["layer"].endswith("/mlp/fc") and r["pass"] == "forward"]
    assert [(r["source"], r["expected"]) for r in mlp] == [("e4m3 x e4m3", "e4m3")]


def test_a_layer_that_does_not_run_as_planned_is_flagged(bf16_step, fp8_step):
    bf16_compiled, bf16_plan, _, _ = bf16_step
    fp8_compiled, fp8_plan, _, _ = fp8_step

    def flagged(table):
        return sorted({r["layer"] for r in _rows(table) if r["mismatch"]})

    # fp8 asked, bf16 ran (flax#4686's silent fallback): exactly the two mlp layers.
    table = audit(bf16_compiled, expected_from_plan(fp8_plan))
    assert flagged(table) == ["blocks/0/mlp/fc", "blocks/0/mlp/proj"]
    assert table.footer[-1][-1] == 2
    # One layer expected in fp8: only that layer's forward dot.
    expected = {**expected_from_plan(bf16_plan), "blocks/0/mlp/fc": "e4m3"}
    assert flagged(audit(bf16_compiled, expected)) == ["blocks/0/mlp/fc"]
    # bf16 asked, fp8 ran: flagged too.
    assert flagged(audit(fp8_compiled, expected_from_plan(bf16_plan))) == [
        "blocks/0/mlp/fc",
        "blocks/0/mlp/proj",
    ]


def test_muon_dots_belong_to_the_optimizer(bf16_step):
    compiled, step_plan, _, _ = bf16_step
    rows = _rows(audit(compiled, expected_from_plan(step_plan)))
    # What the Newton-Schulz products read, Muon's momentum, says they are the optimizer's; the
    # `muon` name scope they run in names them.
    assert "closed_call" not in {r["layer"] for r in rows}
    optimizer = [r for r in rows if r["layer"] == "optimizer (muon)"]
    # Five iterations of three products for each of the four kernels Muon updates.
    assert len(optimizer) == 5 * 3 * 4
    assert {(r["pass"], r["expected"], r["mismatch"]) for r in optimizer} == {("update", "", False)}
    assert rows[-len(optimizer) :] == optimizer  # after the model's forward and backward dots


def test_a_dot_that_reads_the_optimizer_state_is_the_optimizers():
    def step(params, opt_state):
        with jax.named_scope("fc"):
            loss = jnp.sum(params["fc"] @ params["fc"])
        return loss, opt_state["mu"] @ opt_state["mu"].T

    args = {"fc": jnp.ones((4, 4))}, {"mu": jnp.ones((4, 8))}
    dots = hlo_dots(jax.jit(step).lower(*args).compile(), layers={"fc"})
    assert sorted((d.layer, d.pass_) for d in dots) == [("fc", "forward"), ("optimizer", "update")]


def test_an_uncast_kernel_is_an_f32_dot():
    def model(x, params):
        x = x.astype(jnp.bfloat16)
        with jax.named_scope("a"):
            x = x @ params["a"].astype(jnp.bfloat16)
        with jax.named_scope("b"):  # the kernel was never cast: the dot runs in f32
            x = x.astype(jnp.float32) @ params["b"]
        return jnp.sum(x * x)  # (a plain sum would need no forward product of b)

    params = {"a": jnp.ones((8, 8)), "b": jnp.ones((8, 8))}
    step = jax.jit(jax.grad(model, argnums=1))
    table = audit_step(step, (jnp.ones((4, 8)), params), {"a": "bf16", "b": "bf16"})
    rows = {r["layer"]: r for r in _rows(table) if r["pass"] == "forward"}
    assert rows["a"]["source"] == "bf16 x bf16" and not rows["a"]["mismatch"]
    # XLA may even drop the bf16 rounding of a's product on its way into b (excess precision).
    assert rows["b"]["source"] in ("bf16 x f32", "f32 x f32") and rows["b"]["mismatch"]
    # Against f32, layer b is right: a bf16 activation is exact in the f32 product.
    table = audit_step(step, (jnp.ones((4, 8)), params), {"a": "bf16", "b": "f32"})
    assert not any(table.column("mismatch"))


def test_audit_step_compiles_the_step_it_is_given(bf16_step):
    compiled, step_plan, run, batch = bf16_step
    expected = expected_from_plan(step_plan)
    assert audit_step(run.step, (run.state, batch), expected).rows == audit(compiled, expected).rows
    assert audit(compiled.as_text(), expected).rows == audit(compiled, expected).rows


_SNIPPET = """\
HloModule jit_f, is_scheduled=true

%fused_computation (param_0: bf16[4,8], param_1.2: f32[8,2]) -> f32[4,2] {
  %param_0 = bf16[4,8]{1,0} parameter(0)
  %convert.1 = f32[4,8]{1,0} convert(%param_0)
  %param_1.2 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.3 = f32[4,2]{1,0} dot(%convert.1, %param_1.2), lhs_contracting_dims={1}, \
rhs_contracting_dims={0}, metadata={op_name="jit(f)/jvp(blocks/1/mlp/fc)/dot_general" \
stack_frame_id=3}
}

%wrapped_convert_computation (param_0.1: f32[8,2]) -> f32[8,2] {
  %param_0.1 = f32[8,2]{1,0} parameter(0)
  %convert.2 = f8e4m3fn[8,2]{1,0} convert(%param_0.1)
  ROOT %convert.3 = f32[8,2]{1,0} convert(%convert.2)
}

ENTRY %main.9 (x.1: f32[4,8], w.1: f32[8,2]) -> (f32[4,2], f32[2,8]) {
  %x.1 = f32[4,8]{1,0} parameter(0)
  %w.1 = f32[8,2]{1,0} parameter(1)
  %bf = bf16[4,8]{1,0} convert(f32[4,8]{1,0} %x.1)
  %t = bf16[2,4]{1,0} constant({...})
  %wrapped_convert = f32[8,2]{1,0} fusion(%w.1), kind=kLoop, calls=%wrapped_convert_computation
  %fusion = f32[4,2]{1,0} fusion(%bf, %wrapped_convert), kind=kCustom, \
calls=%fused_computation, metadata={op_name="jit(f)/jvp(blocks/1/mlp/fc)/dot_general"}
  %gemm = (bf16[2,8]{1,0}, s8[1024]{0}) custom-call(bf16[2,4]{1,0} %t, bf16[4,8]{1,0} %bf), \
custom_call_target="__cublas$gemm", metadata={op_name="jit(f)/transpose(jvp(blocks/1/mlp/fc))/\
dot_general"}
  ROOT %tuple = (f32[4,2]{1,0}, f32[2,8]{1,0}) tuple(%fusion, %gemm)
}
"""


def test_hlo_dots_reads_a_dot_inside_a_fusion_and_a_gemm_call():
    dot, gemm = hlo_dots(_SNIPPET)
    assert (dot.name, dot.opcode, dot.computation) == ("dot.3", "dot", "fused_computation")
    assert dot.operand_dtypes == (np.dtype(np.float32),) * 2
    assert dot.operand_shapes == ((4, 8), (8, 2))
    # Through the fusion's parameters to its operands: a bf16 convert and an fp8 round trip.
    assert dot.source_dtypes == (BF16, E4M3)
    assert (dot.result_dtype, dot.result_shape) == (np.dtype(np.float32), (4, 2))
    assert (dot.layer, dot.pass_) == ("blocks/1/mlp/fc", "forward")
    assert (gemm.opcode, gemm.pass_, gemm.layer) == ("__cublas$gemm", "backward", "blocks/1/mlp/fc")
    assert gemm.operand_dtypes[1] == gemm.source_dtypes[1] == BF16
    assert (gemm.result_dtype, gemm.result_shape) == (BF16, (2, 8))
    # A bf16 x fp8-grid product computes in bf16 (fp8 values are exact in it), not in fp8.
    assert audit(_SNIPPET, {"blocks/1/mlp/fc": "bf16"}).column("mismatch") == [False, False]
    assert audit(_SNIPPET, {"blocks/1/mlp/fc": "e4m3"}).column("mismatch") == [True, False]


def test_layer_of_reads_the_innermost_layer_scope():
    op = "jit(step_fn)/transpose(jvp(blocks/0/mlp/fc))/transpose(jvp())/dot_general"
    assert layer_of(op) == "blocks/0/mlp/fc"
    assert layer_of("jit(step_fn)/jvp(tok_embed)/dot_general") == "tok_embed"
    assert layer_of("jit(step_fn)/transpose(jvp(bhqk,bhqd->bhkd))/dot_general") is None
    assert layer_of("jit(step_fn)/jvp(jit(z_loss))/reduce_sum") is None
    assert layer_of("jit(f)/blocks/0/attn/qkv/dot_general") == "blocks/0/attn/qkv"
    known = {"blocks/0/attn/qkv"}
    assert layer_of("jit(f)/jvp(model/blocks/0/attn/qkv)/dot_general", known) == known.pop()
    assert layer_of("dot_general") is None and layer_of("jit(f)/jvp(a(b)/dot") is None


def test_layer_of_skips_the_scopes_jax_opens():
    assert layer_of("jit(step_fn)/vmap()/closed_call/dot_general") is None
    op = "jit(f)/transpose(jvp())/while/body/closed_call/blocks/0/fc/dot_general"
    assert layer_of(op) == "blocks/0/fc"
    assert layer_of("jit(f)/cond/branch_1_fun/checkpoint/head/dot_general") == "head"


def test_bad_input_is_explained():
    with pytest.raises(TypeError, match=r"lowered\.compile\(\)"):
        hlo_dots(jax.jit(jnp.sin).lower(1.0))
    with pytest.raises(ValueError, match="no HLO computation"):
        hlo_dots("not hlo")
    with pytest.raises(ValueError, match=r"expected\['fc'\]: unknown dtype 'bf17'"):
        audit(_SNIPPET, {"fc": "bf17"})
    with pytest.raises(TypeError, match="expected_from_plan"):
        audit(_SNIPPET, {"fc": load_precision("bf16-mixed")})
    with pytest.raises(TypeError, match=r"leaf at 'fc/kernel' is str"):
        expected_from_plan({"fc": {"kernel": "bf16"}})
    with pytest.raises(TypeError, match="jitted function"):
        audit_step(lambda x: x, (1.0,), {})
