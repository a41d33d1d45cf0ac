"""Test-wide settings: strict dtype promotion (STYLE.md) and names for the doctests."""

import atexit
import importlib.metadata
import os
import shutil
import tempfile

# XLA's CPU compiler at its cheapest (set before JAX starts its backend; the xdist workers and
# the subprocesses tests start inherit it). Compiling dominates the suite, and the tests check
# what the programs compute, not how fast XLA makes them run: without LLVM's optimizations and
# the fusion emitters, the GPT train step compiles in 0.7 s instead of 5.4 s. The numbers change
# only by floating-point rounding, the same in every run a test compares.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
# jaxlib 0.11 dropped this flag, and an unknown XLA flag ends the process without a word.
if tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2]) < (0, 11):
    _FAST_COMPILE += " --xla_cpu_use_fusion_emitters=false"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

# The cheapest guard against silent upcasts: an implicit f32 * bf16 is an error under test.
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Many tests build the same small runs (experiment.build makes new closures, so the in-memory
# cache misses): a compilation cache on disk compiles each program once per suite. One folder
# per `pytest` invocation, made by the main process and inherited through the environment by
# the xdist workers and the subprocesses tests start, so that timings never depend on an
# earlier run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hybrid_jax_jit_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
# Every program: with the flags above most compile in well under a second, and a cached one
# still loads faster. The environment variable carries it to the subprocesses too.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "standard_promotion: run under JAX's standard dtype promotion, for tests that step Optax "
        "optimizers (optax.adam's bias correction mixes int32 and float, which strict refuses)",
    )


@pytest.fixture(autouse=True)
def _promotion(request):
    # Doctests are examples a user pastes, so they run as a user runs them: standard promotion.
    standard = isinstance(request.node, pytest.DoctestItem) or request.node.get_closest_marker(
        "standard_promotion"
    )
    with jax.numpy_dtype_promotion("standard" if standard else "strict"):
        yield


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(jax=jax, jnp=jnp, np=np, optax=optax)
