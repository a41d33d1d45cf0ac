"""Test-wide settings: strict dtype promotion (STYLE.md) and names for the doctests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The cheapest guard against silent upcasts: an implicit f32 * bf16 is an error under test.
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(jax=jax, jnp=jnp, np=np)
