"""Automatic precision search (hybrid_jax.app.search)."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from hybrid_jax.app import search
from hybrid_jax.app.bench import QUICK, Recipe
from hybrid_jax.app.config import RunConfig

GROUPS = {"attention": "attn/", "mlp": "mlp/"}


def _row(name, gap, state_bytes, diverged=False):
    return {
        "recipe": name,
        "val_loss_gap_pct": gap,
        "state_bytes": state_bytes,
        "temp_bytes": 0,
        "diverged": diverged,
    }


class _FakeCompare:
    """Stands in for bench.compare: a loss gap and memory per rule list, no training."""

    def __init__(self, single, combined):
        self.single, self.combined, self.verified, self.calls = single, combined, [], []

    def __call__(self, recipes, base, log):
        self.calls.append((recipes, base))
        rows = [_row("fp32", 0.0, 1000)]
        for recipe in recipes[1:]:
            if recipe.name == "proposed":
                rules = json.loads(recipe.precision)["rules"]
                key = tuple(sorted(policy for _, policy in rules))
                self.verified.append(key)
                gap, memory = self.combined[key]
                rows.append(_row("proposed", gap, memory))
            else:
                gap, memory = self.single[recipe.name]
                rows.append(_row(recipe.name, gap, memory))
        return rows


def test_steps_back_the_costliest_group_until_the_combination_fits(monkeypatch):
    single = {
        "attention:bf16-mixed": (0.2, 900),
        "attention:bf16-lean": (0.6, 700),
        "mlp:bf16-mixed": (0.1, 900),
        "mlp:bf16-lean": (0.9, 600),
        # Over budget alone, and more memory than fp32: never chosen.
    }
    combined = {
        ("bf16-lean", "bf16-lean"): (1.4, 300),  # both leanest: over the 1% budget together
        ("bf16-lean", "bf16-mixed"): (0.7, 600),  # mlp (costlier, 0.9) steps back: fits
    }
    fake = _FakeCompare(single, combined)
    monkeypatch.setattr(search, "compare", fake)
    result = search.precision_search(
        QUICK, budget_pct=1.0, groups=GROUPS, candidates=("bf16-mixed", "bf16-lean")
    )
    assert fake.verified == [("bf16-lean", "bf16-lean"), ("bf16-lean", "bf16-mixed")]
    assert result.choice == {"attention": "bf16-lean", "mlp": "bf16-mixed"}
    assert result.rules == [("attn/", "bf16-lean"), ("mlp/", "bf16-mixed")]
    assert result.loss_gap_pct == 0.7 <= result.budget_pct
    assert (result.memory_bytes, result.fp32_memory_bytes) == (600, 1000)
    assert result.sensitivity["mlp"] == {"bf16-mixed": 0.1, "bf16-lean": 0.9}
    assert "('attn/', 'bf16-lean')," in str(result)


def test_falls_back_to_fp32_when_nothing_fits(monkeypatch):
    single = {"attention:bf16-lean": (3.0, 700), "mlp:bf16-lean": (2.0, 600)}
    monkeypatch.setattr(search, "compare", _FakeCompare(single, {(): (0.0, 1000)}))
    result = search.precision_search(
        QUICK, budget_pct=1.0, groups=GROUPS, candidates=("bf16-lean",)
    )
    assert result.rules == [] and set(result.choice.values()) == {"fp32"}


def test_every_measuring_run_is_the_base_run_with_only_its_precision_changed(monkeypatch):
    base = dataclasses.replace(
        QUICK,
        optimizer="muon_adamw",
        loss_scale="dynamic",
        fp8_scaling="delayed",
        lr=2e-3,
        muon_lr=3e-2,
        steps=7,
        n_layer=1,
        n_embd=32,
        seed=5,
    )
    single = {"attention:bf16-lean": (0.5, 700), "mlp:bf16-lean": (0.2, 600)}
    fake = _FakeCompare(single, {("bf16-lean", "bf16-lean"): (0.6, 300)})
    monkeypatch.setattr(search, "compare", fake)
    search.precision_search(base, groups=GROUPS, candidates=("bf16-lean",))
    # compare builds each run as its base with the recipe's run settings in place of the base's.
    overridden = {f.name for f in dataclasses.fields(Recipe)} & {
        f.name for f in dataclasses.fields(RunConfig)
    }
    assert {"optimizer", "loss_scale", "fp8_scaling"} <= overridden
    assert len(fake.calls) == 2  # the single-group variants, then the proposed rules
    for recipes, passed in fake.calls:
        assert passed == base
        for recipe in recipes:
            run = dataclasses.replace(base, **{k: getattr(recipe, k) for k in overridden})
            assert run == dataclasses.replace(base, precision=run.precision), recipe.name


def test_bad_arguments(monkeypatch):
    monkeypatch.setattr(search, "compare", _FakeCompare({}, {}))  # a bad argument trains nothing
    with pytest.raises(ValueError, match="budget"):
        search.precision_search(QUICK, budget_pct=-1)
    with pytest.raises(ValueError, match="at least one group"):
        search.precision_search(QUICK, groups={})
    with pytest.raises(ValueError, match="eval_ema=False"):
        search.precision_search(dataclasses.replace(QUICK, ema_decay=0.9, eval_ema=True))


def test_the_benchmark_script_searches_with_the_optimizer_it_is_given(monkeypatch, capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "precision_search.py"
    spec = importlib.util.spec_from_file_location("precision_search_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    bases = []
    monkeypatch.setattr(script, "precision_search", lambda base, **kw: bases.append(base))
    script.main(["--optimizer", "muon_adamw", "--steps", "3"])
    assert (bases[0].optimizer, bases[0].steps) == ("muon_adamw", 3)
    with pytest.raises(SystemExit) as exit_:
        script.main(["--help"])
    assert exit_.value.code == 0 and "--optimizer" in capsys.readouterr().out
