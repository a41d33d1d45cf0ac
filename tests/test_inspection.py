"""hybrid-jax inspect (app.inspection): the plan and memory of a recipe, before training."""

import html

import jax
import numpy as np

from hybrid_jax.app import cli
from hybrid_jax.app.config import RunConfig
from hybrid_jax.app.inspection import inspect_run
from hybrid_jax.app.run import build

TINY = dict(n_layer=1, n_head=2, n_embd=64, block_size=16, batch_size=4)


def test_totals_are_the_bytes_of_the_train_states_arrays():
    # 8-bit moments (codes and scales) and bf16 params: the bytes most easily miscounted.
    config = RunConfig(precision="bf16-lean", optimizer="adamw", **TINY)
    found = inspect_run(config)
    state = build(config).state
    arrays = jax.tree_util.tree_leaves(state)
    allocated = sum(x.nbytes for x in arrays)
    assert found.memory["total"] == allocated
    assert found.memory["params"] == sum(x.nbytes for x in jax.tree_util.tree_leaves(state.params))
    assert found.memory["opt_state"] == sum(
        x.nbytes for x in jax.tree_util.tree_leaves(state.opt_state)
    )
    # The table's total line shows the same parameter bytes, and one row per parameter.
    assert len(found.table.rows) == len(jax.tree_util.tree_leaves(state.params))
    assert found.table.footer[-1][0] == "total"
    assert found.step_memory["temp_bytes"] > 0  # activations of the compiled step


def test_rows_name_the_dtypes_and_groups():
    found = inspect_run(
        RunConfig(precision='{"rules": [["mlp/", "fp8-mixed"]], "default": "bf16-mixed"}', **TINY)
    )
    rows = {row[0]: row for row in found.table.rows}
    assert rows["blocks/0/mlp/fc/kernel"][2:5] == ("f32", "e4m3", "muon")
    assert rows["blocks/0/attn/qkv/kernel"][2:5] == ("f32", "bf16", "muon")
    assert rows["tok_embed/embedding"][4] == "adam (no decay)"
    assert rows["ln_f/scale"][4] == "adam (no decay)"
    text = str(found)
    assert "bytes each" in text and "temporaries" in text
    page = found._repr_html_()  # a notebook shows the table and both lines
    assert page.startswith("<table>") and all(html.escape(line) in page for line in found.lines())
    np.testing.assert_allclose(
        found.memory["bytes_per_param"], found.memory["total"] / found.memory["num_params"]
    )


def test_the_command_prints_the_table_and_rejects_bad_input(capsys):
    args = ["inspect", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8"]
    assert cli.main([*args, "--audit"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["path", "shape", "param"]
    assert "compiled step (XLA memory analysis)" in out
    assert "precision audit of the compiled step" in out and "blocks/0/mlp/fc" in out
    assert cli.main([*args, "--precision", "bf17"]) == 2
    assert "cannot parse policy 'bf17'" in capsys.readouterr().err
