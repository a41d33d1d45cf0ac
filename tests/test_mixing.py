"""The mixing package as a whole: its public names, plain-number leaves, sharding."""

import os
import subprocess
import sys
import textwrap

from hybrid_jax import mixing


def test_the_package_keeps_the_public_names_of_the_former_module():
    assert sorted(mixing.__all__) == [
        "EMA",
        "GreedySoupInfo",
        "ema_init",
        "ema_update",
        "greedy_soup",
        "interpolate",
        "merge",
        "uniform_soup",
    ]
    # The functions, not submodules of the same name, are what hj.mixing.<name> gives.
    assert all(callable(getattr(mixing, name)) for name in mixing.__all__)


def test_plain_python_number_leaves():
    a, b = {"x": 1.0, "n": 3, "flag": True}, {"x": 3.0, "n": 5, "flag": False}
    assert mixing.ema_update(mixing.ema_init(a), b, 0, decay=0.5)["x"] == 2.0
    assert mixing.uniform_soup([a, b]) == {"x": 2.0, "n": 3, "flag": True}
    assert mixing.interpolate(a, b, 0.75) == {"x": 2.5, "n": 5, "flag": False}
    assert mixing.merge({"a": a, "b": b}, [("x", "a")], default="b") == {**b, "x": 1.0}


# --------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------


def test_sharded_leaves_keep_their_sharding():
    # A fresh interpreter with 4 CPU devices: the device count is fixed when JAX starts.
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from hybrid_jax import mixing

        mesh = jax.make_mesh((4,), ("d",))
        s = NamedSharding(mesh, P("d"))
        a = {"w": jax.device_put(jnp.arange(8.0), s),
             "h": jax.device_put(jnp.arange(8.0).astype(jnp.bfloat16), s)}
        b = jax.tree_util.tree_map(lambda x: x + jnp.asarray(1, x.dtype), a)
        outs = [
            mixing.ema_init(a, dtype=jnp.float32),
            mixing.ema_update(a, b, 3, warmup_steps=10),
            jax.jit(mixing.ema_update)(a, b, jnp.int32(3)),
            mixing.uniform_soup([a, b]),
            mixing.merge({"a": a, "b": b}, [("w", "a"), ("h", "b")]),
            mixing.interpolate(a, b, 0.3),
        ]
        for out in outs:
            for x in jax.tree_util.tree_leaves(out):
                assert x.sharding.is_equivalent_to(s, x.ndim), x.sharding
        print("ok")
        """
    )
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
