# %% [markdown]
# # Numerics: what a recipe computes in, and where its numbers break
#
# Three tools, from before training to after it:
#
# 1. **inspect** (`hybrid-jax inspect`): each parameter's precision plan, optimizer group and
#    bytes, and XLA's memory analysis of the compiled train step. Nothing is trained.
# 2. **the dot audit** (`hybrid-jax inspect --audit`): every matrix product of the compiled
#    step with the dtypes its operands really come from, checked against the plan.
# 3. **numerics telemetry** (`hybrid-jax train --diagnose`): for a trained state, the fraction
#    of parameters, gradients and activations that would underflow or overflow in fp16, e4m3
#    and e5m2, and the updates the storage dtype rounds away.
#
# The recipe: a per-layer rule list with fp32 embeddings and norms, fp8 (e4m3) MLP matmuls and
# fp16 everywhere else, on a one-layer GPT. fp16 compute turns on dynamic loss scaling.

# %%
import dataclasses
import json

import jax
import jax.numpy as jnp

import hybrid_jax as hj
from hybrid_jax.app.config import RunConfig
from hybrid_jax.app.diagnose import diagnose
from hybrid_jax.app.inspection import inspect_run
from hybrid_jax.app.run import build

rules = {"rules": [["embed|ln_", "fp32"], ["mlp/", "fp8-mixed"]], "default": "fp16-mixed"}
config = RunConfig(
    precision=json.dumps(rules),  # a preset name, a policy string, or rules as JSON
    optimizer="adamw",
    n_layer=1,
    n_head=2,
    n_embd=32,
    block_size=16,
    batch_size=8,
    steps=50,
    warmup_steps=5,
    eval_batches=1,
)

# %% [markdown]
# ## 1. Inspect: the plan and the bytes, before training

# %%
found = inspect_run(config, audit=True)
print("\n".join(found.lines()))
found.table

# %% [markdown]
# ## 2. The dot audit: what each matmul really reads
#
# One row per dot of the compiled step. `operands` is what the dot itself reads, `source` the
# dtype its operands were rounded to before that: on a CPU, XLA has no fp16 or fp8 matmul and
# converts the operands back to f32 around the dot, so `source` is the column that shows the
# plan at work (f16 attention, e4m3 MLP forward, e5m2 gradients backward). `mismatch` flags a
# forward dot whose layer does not compute in the dtype its plan asks for; the footer counts
# them and names planned layers with no dot at all (`pos_embed` is only looked up).

# %%
found.audit

# %% [markdown]
# The audit reads any jitted function's optimized HLO, and finds layers by `jax.named_scope`.
# A layer meant to run in bf16 whose kernel nobody cast is flagged:


# %%
def layer(x, w):
    with jax.named_scope("mlp/fc"):
        return x @ w  # fp32: nobody cast to bf16


hj.diagnostics.audit_step(
    jax.jit(layer), (jnp.ones((8, 16)), jnp.ones((16, 32))), {"mlp/fc": "bf16"}
)

# %% [markdown]
# ## 3. Telemetry of a trained state
#
# Train the run for a few steps (`build` gives its state, jitted step and batches), then
# measure. Each step's metrics carry the loss scale and whether the step was skipped.

# %%
run = build(config)
state = run.state
for t in range(config.steps):
    state, metrics = run.step(state, run.sample_train(jax.random.fold_in(run.data_key, t)))
print(
    f"loss {float(metrics['loss']):.3f}, loss scale {float(metrics['loss_scale']):g}, "
    f"skipped {int(metrics['skipped'])} (last step)"
)
batch = run.sample_train(jax.random.fold_in(run.data_key, config.steps))
report = diagnose(run, state, batch)

# %% [markdown]
# What each format can hold: values below `underflows` flush to zero, values above `overflows`
# become infinite. fp8 is used with a per-tensor scale (its amax mapped to the format's max), so
# for e4m3 and e5m2 the `_scaled_under` columns below are the ones that apply.

# %%
hj.diagnostics.limits_table()

# %% [markdown]
# The gradients of the activations entering each matmul are the values fp16 loses first. They
# are measured as the step computes them: from the loss times the loss scale (here 2^15), in
# the compute dtype, then unscaled. `zeros` is the fraction the backward pass flushed to zero,
# `f16_under` the fraction of `gradient x loss scale` below fp16's smallest subnormal, and
# `suggest` the narrowest format whose range holds the tensor (fp8 with its per-tensor scale).
# With the loss scale, nothing flushes.

# %%
report.activation_gradients

# %% [markdown]
# The same state without loss scaling. The largest gradient entering the attention's `qkv`
# matmul is below fp16's smallest normal number (6.1e-05, in the table of limits): every one of
# them is subnormal in fp16, with fewer significant bits, and the smallest flush to zero
# (`zeros`; `min_abs_nonzero` is now fp16's smallest subnormal). Each gradient shrinks with the
# number of tokens the loss averages over, so a real batch loses far more. bf16 has fp32's
# exponent range and needs no loss scale.

# %%
unscaled = diagnose(run, dataclasses.replace(state, loss_scale=hj.NoOpLossScale()), batch)
unscaled.activation_gradients

# %% [markdown]
# The report also has `report.params`, `report.gradients` (of the master weights),
# `report.activations` and `report.stagnation` (the fraction of each update the parameter's
# storage dtype rounds away: zero here, with fp32 master weights; try `bf16-pure`), and
# `print(report)` prints them all. For any pytree of your own (gradients, activations),
# `hj.diagnostics.numerics_report(tree, scale=...)` gives the same table.

# %%
report.stagnation
