# %% [markdown]
# # An Equinox model with per-layer precision and Muon + AdamW by path
#
# An Equinox model is a pytree, so it trains with the library's pure functions
# (`TrainState.create`, `make_train_step`) once its arrays are split from the rest:
#
# ```python
# params, static = eqx.partition(model, eqx.is_inexact_array)  # arrays | functions, sizes
# model = eqx.combine(params, static)                          # inside the loss function
# ```
#
# `params` holds `None` where `static` has a leaf (the activation, say); casts, optimizers and
# the step pass it through. Path rules read the module's field names and list indices
# (`layers/0/weight`). Here a small
# MLP learns `y = sin(3x)` with its first and last layers in fp32 and its hidden layers
# computing in bf16 (all master weights fp32), Muon on the hidden matrices and AdamW on the rest.

# %%
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import hybrid_jax as hj


class MLP(eqx.Module):
    layers: list[eqx.nn.Linear]

    def __init__(self, key):
        sizes = [1, 64, 64, 64, 1]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [
            eqx.nn.Linear(m, n, key=k) for m, n, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        ]

    def __call__(self, x):
        # Each layer computes in its weight's dtype: the precision rules decide it per layer.
        for layer in self.layers[:-1]:
            x = jax.nn.gelu(layer(x.astype(layer.weight.dtype)))
        last = self.layers[-1]
        return last(x.astype(last.weight.dtype)).astype(jnp.float32)


model = MLP(jax.random.key(0))
params, static = eqx.partition(model, eqx.is_inexact_array)
x = jnp.linspace(-2, 2, 256)[:, None]
batch = {"x": x, "y": jnp.sin(3 * x)}

# %% [markdown]
# `eqx.nn.Linear` computes in whatever its input and weight promote to, so the model casts each
# layer's input to the layer's weight dtype (what `dtype=` does on a Flax layer). The rules
# then choose each layer's precision; the first match wins. The table is the plan: where each
# array is stored and what it computes in.

# %%
rules = hj.PrecisionRules([(r"^layers/(0|3)/", "fp32")], default="bf16-mixed")
rules.summary(params)

# %% [markdown]
# Optimizers by path, over the same strings. `hj.optim.muon_adamw_rules` names the bundled GPT's
# layers (`blocks/<i>/.../kernel`), so an Equinox model writes its own two rules. Equinox
# stores a weight as `(out, in)`; `consistent_rms` scales Muon's update by the larger side,
# whichever axis it is. `describe` lists each parameter's group and its optimizer state.

# %%
opt_rules = [
    (r"^layers/(1|2)/weight$", hj.optim.muon(0.02, consistent_rms=0.2)),  # hidden matrices
    (r".*", optax.adamw(3e-3)),  # input and output layers, biases
]
tx = hj.optim.by_path(opt_rules)
hj.optim.describe(opt_rules, params)

# %% [markdown]
# The loss function gets the parameters already cast by the rules and puts the model back
# together with `eqx.combine`. The step is one jitted function of the state.


# %%
def loss_terms(compute_params, batch, rng):
    model = eqx.combine(compute_params, static)
    y = jax.vmap(model)(batch["x"])
    return {"mse": jnp.mean((y - batch["y"]) ** 2)}


def train(precision, steps=300):
    state = hj.TrainState.create(params, tx, precision=precision)
    step = hj.make_train_step(loss_terms, optimizer=tx, precision=precision)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    return state, float(metrics["loss"]), time.perf_counter() - start


state, loss, seconds = train(rules)
_, loss_fp32, _ = train("fp32")
print(f"per-layer rules: loss {loss:.5f} after 300 steps ({seconds:.1f} s, compile included)")
print(f"fp32 throughout: loss {loss_fp32:.5f}")

# %% [markdown]
# bf16 in the hidden layers costs nothing visible here: both runs fit the curve, and the gap
# between them is where different roundings led two 300-step trajectories, not a gain from bf16.
# The trained arrays (fp32 masters) and the static half make an ordinary Equinox model again.

# %%
trained = eqx.combine(state.params, static)
y = jax.vmap(trained)(jnp.array([[-1.0], [0.5]]))
print(
    f"dtype {trained.layers[1].weight.dtype}; model(-1, 0.5) = {y.ravel()}, "
    f"sin(-3, 1.5) = {jnp.sin(jnp.array([-3.0, 1.5]))}"
)
