"""hybrid-jax bench (hybrid_jax.app.bench): recipes, the comparison run, and its files."""

import csv
import json
import math

import pytest

from hybrid_jax.app import bench, cli


def test_recipe_names_are_checked_and_fp32_comes_first():
    assert [r.name for r in bench.parse_recipes("bf16-mixed,fp32")] == ["fp32", "bf16-mixed"]
    assert [r.name for r in bench.parse_recipes(["int8-qat"])] == ["fp32", "int8-qat"]
    assert len(bench.parse_recipes(None)) == len(bench.RECIPES)
    with pytest.raises(ValueError, match="unknown recipes \\['fp4'\\]; known: fp32"):
        bench.parse_recipes("bf16-mixed,fp4")
    with pytest.raises(ValueError, match="no recipes"):
        bench.parse_recipes(" , ")
    # The list, by name.
    for name in ("fp16-naive", "bf16-pure-sr", "bf16-pure-kahan", "fp8-mixed", "adam8bit"):
        assert name in bench.RECIPES


def test_every_recipe_builds_a_valid_run_config():
    from hybrid_jax.app.config import load_precision

    for recipe in bench.RECIPES.values():
        load_precision(recipe.precision)  # raises on a bad policy or rule list


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    status = cli.main(
        ["bench", "--quick", "--recipes", "bf16-mixed", "--steps", "4", "--out", str(out)]
    )
    assert status == 0
    return out


def test_bench_writes_results_json_csv_and_plots(bench_out):
    rows = json.loads((bench_out / "results.json").read_text())
    assert [r["recipe"] for r in rows] == ["fp32", "bf16-mixed"]
    numeric = (
        "step_time_ms",
        "step_time_ratio_vs_fp32",
        "tokens_per_s",
        "compile_s",
        "state_bytes_per_param",
        "final_val_loss",
        "val_loss_gap_pct",
        "temp_bytes",
    )
    for row in rows:
        for column in numeric:
            assert isinstance(row[column], (int, float)) and math.isfinite(row[column]), column
        assert row["skipped_steps"] == 0 and row["diverged"] is False
        assert row["backend"] == "cpu" and row["device_kind"]
        assert row["timed_steps"] == 2  # 4 steps, 2 warm-up steps left out
        assert [step for step, _ in row["val_loss_curve"]] == [0, 4]
        assert row["eval_elapsed_s"][0] == 0 < row["eval_elapsed_s"][1]
    assert rows[0]["step_time_ratio_vs_fp32"] == 1.0 and rows[0]["val_loss_gap_pct"] == 0.0
    assert rows[0]["state_bytes_per_param"] == pytest.approx(12.0, abs=0.01)  # fp32 AdamW

    with open(bench_out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == bench.CSV_COLUMNS
    assert [r["recipe"] for r in table] == ["fp32", "bf16-mixed"]
    for row in table:
        float(row["step_time_ms"]), float(row["val_loss_gap_pct"])  # numbers, not blanks
    for name in ("val_loss.png", "time_memory.png"):
        assert (bench_out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_table_says_how_it_was_measured(bench_out):
    rows = json.loads((bench_out / "results.json").read_text())
    text = str(bench.table(rows))
    assert text.splitlines()[0].split()[:3] == ["recipe", "step", "ms"]
    assert "bf16-mixed" in text
    notes = "\n".join(bench.notes(rows))
    assert "2 timed steps per recipe" in notes and "not faster here" in notes


def test_bad_recipe_on_the_command_line_is_an_error(capsys):
    assert cli.main(["bench", "--recipes", "fp9"]) == 2
    assert "unknown recipes ['fp9']" in capsys.readouterr().err
