# %% [markdown]
# # Two tasks, one trunk: fixed, scheduled and learned loss weights, and PCGrad
#
# A train step minimises `L = Σ λ_i L_i` over named loss terms. `hybrid_jax.losses` gives the
# weightings (fixed or scheduled `Weighted`, learned `Uncertainty`, loss-driven `DWA`) and the
# gradient mixers (`PCGrad`) behind one interface, and `make_train_step` drives them all alike.
#
# The toy: a shared one-layer trunk with two linear heads, on one input `x`. Task `a` is
# `sin(3x)`, nearly noise-free; task `b` is `4|x| - 4`, ten times larger and with unit-variance
# noise. With equal weights the noisy task dominates the trunk's gradient.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import hybrid_jax as hj

rng = np.random.default_rng(0)


def make_data(n, noise=True):
    x = rng.uniform(-2, 2, (n, 1)).astype(np.float32)
    a = np.sin(3 * x) + noise * 0.05 * rng.normal(size=x.shape)
    b = 4 * np.abs(x) - 4 + noise * 1.0 * rng.normal(size=x.shape)
    return {"x": jnp.asarray(x), "a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}


train_set, test_set = make_data(256), make_data(512, noise=False)  # test on the clean targets

key_trunk, key_a, key_b = jax.random.split(jax.random.key(0), 3)
width = 16
params = {
    "trunk": {"kernel": jax.random.normal(key_trunk, (1, width)), "bias": jnp.zeros(width)},
    "head_a": {"kernel": jax.random.normal(key_a, (width, 1)) / width**0.5},
    "head_b": {"kernel": jax.random.normal(key_b, (width, 1)) / width**0.5},
}


def loss_terms(params, batch, rng):  # (compute params, batch, PRNG key) -> {name: scalar}
    h = jnp.tanh(batch["x"] @ params["trunk"]["kernel"] + params["trunk"]["bias"])
    return {
        "a": jnp.mean((h @ params["head_a"]["kernel"] - batch["a"]) ** 2),
        "b": jnp.mean((h @ params["head_b"]["kernel"] - batch["b"]) ** 2),
    }


# %% [markdown]
# Do the tasks pull the trunk apart? `term_gradients` gives each term's gradient from one
# forward pass and one batched backward pass; `gram_matrix` their dot products. A negative
# cosine means a step for one task undoes progress on the other: that is what PCGrad projects
# away.


# %%
@jax.jit
def gradient_cosine(params):
    _, grads = hj.losses.term_gradients(loss_terms, params, train_set, None)
    gram = hj.losses.gram_matrix(grads)  # [2, 2]: g_a·g_a, g_a·g_b, ...
    return gram[0, 1] / jnp.sqrt(gram[0, 0] * gram[1, 1])


print(f"cosine(grad a, grad b) at initialisation: {gradient_cosine(params):+.3f}")

# %% [markdown]
# Four recipes, each a weighting and optionally a mixer:
#
# - **fixed**: `λ_a = λ_b = 1`.
# - **scheduled**: task `b` ramps in from 0 to 1 over the first half (any Optax schedule works).
# - **uncertainty** (Kendall et al., 2018): learns `s_i = log sigma_i²` and weights each term by
#   `exp(-s_i)`, which settles near `1 / L_i`: the noisier task gets the smaller weight.
# - **PCGrad** (Yu et al., 2020): equal weights, but where the two gradients conflict each is
#   projected onto the normal plane of the other before they are added.
#
# Learned weights live in the `TrainState`, so `TrainState.create` needs the weighting and the
# term names; the step updates them with the model.

# %%
steps = 500
ramp = optax.linear_schedule(0.0, 1.0, steps // 2)  # a function of the step
recipes = {
    "fixed": (hj.losses.Weighted({"a": 1.0, "b": 1.0}), None),
    "scheduled": (hj.losses.Weighted({"a": 1.0, "b": ramp}), None),
    "uncertainty": (hj.losses.Uncertainty(optimizer=optax.adam(3e-2)), None),
    "PCGrad": (hj.losses.Weighted({"a": 1.0, "b": 1.0}), hj.losses.PCGrad()),
}

history, final = {}, {}
for name, (weighting, mixer) in recipes.items():
    optimizer = optax.adam(1e-2)
    step = hj.make_train_step(loss_terms, optimizer=optimizer, weighting=weighting, mixer=mixer)
    state = hj.TrainState.create(params, optimizer, weighting=weighting, loss_names=["a", "b"])
    metrics, cosines = [], []
    for _ in range(steps):
        cosines.append(gradient_cosine(state.params))  # before the step, which donates the state
        state, m = step(state, train_set)
        metrics.append(m)
    metrics = jax.device_get(metrics)  # one transfer at the end
    history[name] = {k: np.array([m[k] for m in metrics]) for k in metrics[0]}
    history[name]["cosine"] = np.array(jax.device_get(cosines))
    final[name] = {k: float(v) for k, v in loss_terms(state.params, test_set, None).items()}

sorted(m)  # what the step reports, each step

# %% [markdown]
# The weights each recipe applied, step by step (`weight/a`, `weight/b` in the step's metrics):

# %%
fig, axes = plt.subplots(1, len(recipes), figsize=(15, 3), sharey=True)
for ax, (name, h) in zip(axes, history.items(), strict=True):
    ax.semilogy(h["weight/a"], label="λ_a")
    ax.semilogy(h["weight/b"], label="λ_b")
    ax.set(title=name, xlabel="step")
axes[0].set_ylabel("weight")
axes[0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The raw training loss of each task (not the weighted total: `Uncertainty`'s total includes
# `Σ s_i` and goes negative), and the cosine between the two tasks' gradients along each run.
# With equal weights the gradients conflict almost all the way; PCGrad does not make them
# agree, it keeps each step from following the component that undoes the other task.

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
for name, h in history.items():
    axes[0].semilogy(h["loss/a"], label=name)
    axes[1].semilogy(h["loss/b"], label=name)
    axes[2].plot(h["cosine"], label=name)
axes[0].set(title="task a (noise variance 0.0025)", xlabel="step", ylabel="training loss")
axes[1].set(title="task b (noise variance 1)", xlabel="step")
axes[2].set(title="cosine(grad a, grad b)", xlabel="step")
axes[2].axhline(0, color="gray", linewidth=0.5)
axes[0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Test error against the clean targets, and the final weights. Here the schedule and PCGrad
# both fit the clean task better than fixed weights without losing on the noisy one;
# uncertainty weighting weights `a` by about `1 / sigma_a²`, fits it far better and gives up some of
# the noisy task. Which trade is right depends on what the tasks are for.

# %%
hj.Table(
    ("recipe", "test MSE a", "test MSE b", "final λ_a", "final λ_b"),
    tuple(
        (
            name,
            f"{final[name]['a']:.4f}",
            f"{final[name]['b']:.4f}",
            f"{history[name]['weight/a'][-1]:.3g}",
            f"{history[name]['weight/b'][-1]:.3g}",
        )
        for name in recipes
    ),
)
