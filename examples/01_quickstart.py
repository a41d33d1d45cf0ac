# %% [markdown]
# # Quickstart: your own NNX model, bf16-mixed, Muon + AdamW by path
#
# Any Flax NNX model trains with a precision plan and a hybrid optimizer through
# `hybrid_jax.models.Trainer`, an `nnx.Optimizer` that also casts to the compute dtype, scales
# the loss and skips non-finite steps. Here: a small MLP learns `y = sin(3x)`, with fp32 master
# weights, bf16 matmuls, Muon on the hidden matrix and AdamW on everything else.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax
from flax import nnx

import hybrid_jax as hj
from hybrid_jax.models import Trainer


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        sizes = [(1, 64), (64, 64), (64, 1)]
        self.layers = nnx.List([nnx.Linear(i, o, rngs=rngs) for i, o in sizes])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.gelu(layer(x))
        return self.layers[-1](x)


x = jnp.linspace(-2, 2, 256)[:, None]
batch = {"x": x, "y": jnp.sin(3 * x)}

# %% [markdown]
# The ten lines: a policy, a loss that feeds the model its compute dtype, optimizers by path,
# and the trainer. Flax layers compute in the promoted dtype of input and kernel, so the loss
# casts the input (as jmp's `policy.cast_to_compute` does).

# %%
policy = hj.Policy.parse("bf16-mixed")  # params fp32, compute bf16, output fp32


def loss_fn(model, batch):
    y = model(policy.cast_to_compute(batch["x"]))
    return jnp.mean((policy.cast_to_output(y) - batch["y"]) ** 2)


optimizer = hj.optim.by_path(
    [(r"layers/1/kernel", hj.optim.muon(0.02))],  # the hidden matrix
    default=optax.adamw(3e-3),  # input and output layers, biases
)
model = MLP(nnx.Rngs(0))
trainer = Trainer(model, loss_fn, optimizer, precision=policy)
losses = [float(trainer.step(batch)["loss"]) for _ in range(300)]
print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")

# %% [markdown]
# The model object now holds the trained fp32 master weights; call it as usual.

# %%
plt.figure(figsize=(8, 3))
plt.subplot(1, 2, 1)
plt.semilogy(losses)
plt.xlabel("step")
plt.ylabel("loss")
plt.subplot(1, 2, 2)
plt.plot(x, batch["y"], label="sin(3x)")
plt.plot(x, model(x), label="model (fp32 weights)")
plt.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Which leaf got which precision and which optimizer, as tables:

# %%
params = nnx.state(model, nnx.Param)
hj.PrecisionRules([], default=policy).summary(params)

# %%
hj.optim.describe([(r"layers/1/kernel", hj.optim.muon(0.02))], params, default=optax.adamw(3e-3))

# %% [markdown]
# Per-path precision is one argument away: `PrecisionRules` give the first layer fp32 and the
# hidden layer fp8 matmuls (e4m3 operands with per-tensor scales), bf16 elsewhere.

# %%
rules = hj.PrecisionRules([(r"layers/0/", "fp32"), (r"layers/1/", "fp8-mixed")], default=policy)
model = MLP(nnx.Rngs(0))
trainer = Trainer(model, loss_fn, optimizer, precision=rules)
losses = [float(trainer.step(batch)["loss"]) for _ in range(300)]
print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
rules.summary(nnx.state(model, nnx.Param))
