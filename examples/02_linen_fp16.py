# %% [markdown]
# # A Flax Linen model in fp16 with dynamic loss scaling
#
# The library's core takes pytrees, so a Linen model's `variables` dict trains with the pure
# functions directly: `TrainState.create` and `make_train_step`. fp16 has 5 exponent bits: a
# gradient below about 6e-8 flushes to zero and a value above 65504 overflows. A dynamic loss
# scale multiplies the loss before the backward pass (so small gradients survive), divides the
# gradients after it, and when they overflow, skips the step and halves the scale; after
# `period` good steps it doubles the scale again. This notebook starts the scale far too high
# on purpose, to show what the skip metrics look like while it finds its level.

# %%
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import hybrid_jax as hj


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(64)(x))
        x = nn.gelu(nn.Dense(64)(x))
        return nn.Dense(1)(x)


model = MLP()
x = jnp.linspace(-2, 2, 256)[:, None]
batch = {"x": x, "y": jnp.sin(3 * x)}
variables = model.init(jax.random.key(0), x)

# %% [markdown]
# The policy casts every parameter to fp16 for the forward and backward pass and keeps fp32
# master weights for the update. The loss function gets the parameters already cast.

# %%
policy = hj.Policy.parse("fp16-mixed")


def loss_terms(compute_variables, batch, rng):
    y = model.apply(compute_variables, policy.cast_to_compute(batch["x"]))
    return {"mse": jnp.mean((policy.cast_to_output(y) - batch["y"]) ** 2)}


tx = optax.adam(3e-3)
loss_scale = hj.DynamicLossScale(2.0**40, period=50)  # 2**40 overflows fp16 on purpose
state = hj.TrainState.create(variables, tx, loss_scale=loss_scale, precision=policy)
step = hj.make_train_step(loss_terms, optimizer=tx, precision=policy, loss_scale=loss_scale)

history = []
for _ in range(300):
    state, metrics = step(state, batch)
    history.append(jax.tree_util.tree_map(float, metrics))
skipped = [m["skipped"] for m in history]
print(
    f"{int(sum(skipped))} of {len(history)} steps skipped; loss {history[0]['loss']:.4f} -> "
    f"{history[-1]['loss']:.4f}; final scale 2**{np.log2(history[-1]['loss_scale']):.0f}"
)

# %% [markdown]
# The first steps overflow and are skipped: the parameters, the optimizer state and Adam's
# step count stay bitwise as they were, and the scale halves each time until the scaled
# gradients fit in fp16. From then on every `period` good steps it tries a doubling; a
# doubling that overflows is skipped and undone. The loss only moves on applied steps.

# %%
steps = np.arange(len(history))
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].semilogy(steps, [m["loss_scale"] for m in history], base=2)
axes[0].scatter(
    steps[np.array(skipped) > 0],
    [m["loss_scale"] for m in history if m["skipped"]],
    color="red",
    s=8,
    label="skipped",
)
axes[0].set(xlabel="step", ylabel="loss scale")
axes[0].legend()
axes[1].semilogy(steps, [m["loss"] for m in history])
axes[1].set(xlabel="step", ylabel="loss")
plt.tight_layout()
plt.show()

# %% [markdown]
# Where each parameter lives and computes: the plan of the policy over the Linen paths
# (`params/Dense_0/kernel`, ...).

# %%
hj.PrecisionRules([], default=policy).summary(variables)

# %% [markdown]
# Per-path rules work the same over Linen paths. fp8 or int8 compute needs the matmul itself
# swapped: `hybrid_jax.models.quantize_linen_matmuls(variables, rules)` intercepts `nn.Dense`
# and `nn.DenseGeneral` by path. Here the first layer computes its matmul in fp8 and the rest
# in fp16, still under the dynamic loss scale.

# %%
from hybrid_jax.models import quantize_linen_matmuls

rules = hj.PrecisionRules([(r"Dense_0/", "fp8-mixed")], default=policy)
matmuls = quantize_linen_matmuls(variables, rules)


def fp8_loss_terms(compute_variables, batch, rng):
    with matmuls.intercept():
        y = model.apply(compute_variables, batch["x"].astype(jnp.float16))
    return {"mse": jnp.mean((y.astype(jnp.float32) - batch["y"]) ** 2)}


loss_scale = hj.DynamicLossScale(2.0**15)
state = hj.TrainState.create(variables, tx, loss_scale=loss_scale, precision=matmuls.plan)
step = hj.make_train_step(
    fp8_loss_terms, optimizer=tx, precision=matmuls.plan, loss_scale=loss_scale
)
for _ in range(300):
    state, metrics = step(state, batch)
print(f"fp8 + fp16: loss {float(metrics['loss']):.4f}, scale {float(metrics['loss_scale']):.0f}")
rules.summary(variables)
