# %% [markdown]
# # Compare precision recipes: step time, memory and loss
#
# `hybrid-jax bench` trains one GPT on the bundled Tiny Shakespeare under several precision
# recipes, on the same data and seed, and reports each recipe's step time, memory and
# validation loss next to fp32's. In Python it is `hybrid_jax.app.bench`: `compare` trains the
# recipes (interleaved, step by step, so that a busy machine slows them all alike), `table`
# tabulates the results, and `write_outputs` writes `results.json`, `results.csv` and PNG plots.
#
# Here: fp32, bf16-mixed (fp32 master weights, bf16 compute) and bf16-lean (bf16 parameters,
# stochastically rounded updates, 8-bit Adam moments) on a one-layer GPT for 100 steps, small
# enough for a laptop CPU. `bench.RECIPES` has the other recipes (`fp8-mixed`, `int8-qat`,
# `fp16-mixed`, ...), and `bench.main(quick=True)` (`hybrid-jax bench --quick`) is the larger
# setting.

# %%
# %matplotlib inline
import dataclasses

from IPython.display import display

from hybrid_jax.app import bench

recipes = bench.parse_recipes("bf16-mixed,bf16-lean")  # fp32, the reference, is always added
for recipe in recipes:
    print(f"{recipe.name:11} {recipe.precision:11} {recipe.description}")

# %% [markdown]
# The run's settings are a `RunConfig`; `bench.QUICK` is the `--quick` one, made smaller here.
# Every recipe is compiled first (the compile time is one of the columns), then trained.

# %%
config = dataclasses.replace(
    bench.QUICK,
    n_layer=1,
    n_head=2,
    n_embd=32,
    block_size=16,
    steps=100,
    warmup_steps=10,
    eval_interval=10,
    eval_batches=2,
    eval_batch_size=16,
)
rows = bench.compare(recipes, config)

# %% [markdown]
# One row per recipe: median step time and its ratio to fp32, tokens/s, compile time, XLA's
# temporaries (activations and scratch), bytes of training state per parameter, the final
# validation loss and its gap to fp32, skipped steps.

# %%
print("\n".join(bench.notes(rows)))
bench.table(rows)

# %% [markdown]
# Each row is also a dict with the raw numbers, including the validation-loss curve;
# `bench.plots(rows)` draws the bench's two figures from them (matplotlib `Figure`s, shown
# inline by `display`, saved as PNGs by `write_outputs`).

# %%
figures = bench.plots(rows)
display(figures["val_loss"])
display(figures["time_memory"])

# %% [markdown]
# On a CPU, XLA computes bf16 matmuls in fp32 with conversions around them, so the low-precision
# recipes are slower here, not faster; run the same cells on a GPU or TPU to see their gain.
# Memory is where bf16-lean differs on any backend: bf16 parameters and 8-bit moments instead
# of fp32 ones, so the state the step reads (its arguments) shrinks, while its temporaries grow
# (it decodes the moments and draws random bits for the rounding); at scale the state is what
# counts. Leaves under 4,096 elements keep fp32 moments, so on a model this small the saving
# per parameter is partial.
#
# To keep the results, `bench.write_outputs(rows, "bench")` writes `results.json`,
# `results.csv`, `val_loss.png` and `time_memory.png` into the folder `bench`.
