"""benchmarks/device_check.py: its CPU path runs every section and writes a complete JSON.

The script is meant for a few minutes of borrowed accelerator time, where it must work the first
time; on CPU it runs the same code at toy sizes, and these tests keep that path from rotting.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import pytest

PATH = Path(__file__).parents[1] / "benchmarks" / "device_check.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("device_check_script", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_cpu_run_fills_every_section(script, tmp_path, capsys):
    # About 15 s on 2 busy cores: four toy GPT train steps compiled and run (section a), the fp8
    # probe's five small programs (b), five 128^3 matmuls (c) and a 4-step fp32 bench (d).
    if jax.default_backend() != "cpu":
        pytest.skip("the toy path is the CPU path")
    report = script.main(["--out", str(tmp_path)])
    assert json.loads((tmp_path / "device_check.json").read_text()) == json.loads(
        json.dumps(script._jsonable(report))
    )
    assert report["complete"] and report["env"]["toy_sizes"]
    assert report["env"]["peak_bf16_tflops"] is None  # no MFU on CPU
    sections = report["sections"]
    assert list(sections) == ["a", "b", "c", "d"]
    for name, section in sections.items():
        assert section["status"] == "ok", (name, section.get("error"), section.get("traceback"))
        assert _number(section["seconds"])

    assert sections["a"]["data"]["kind"].startswith("token folder")
    runs = sections["a"]["runs"]
    assert [r["variant"] for r in runs] == [v[0] for v in script.VARIANTS]
    for run in runs:
        for key in ("step_ms", "tokens_per_s", "model_tflops", "compile_s", "final_loss"):
            assert _number(run[key]) and run[key] >= 0, (run["variant"], key)
        assert run["mfu"] is None and run["flops_per_token"] > 6 * run["n_params"]
        assert run["batch_size"] == 2 and run["skipped_steps"] == 0

    for variant in sections["b"]["variants"]:
        # 4 Linear layers per block and the tied head, x 3 products each.
        assert variant["quantized_layers"] == 4 * 1 + 1
        assert variant["expected_fp8_gemms"] == 3 * variant["quantized_layers"]
        assert variant["dots_in_quantized_layers"] == variant["expected_fp8_gemms"]
        assert variant["fp8_gemms"] == 0  # XLA:CPU has no fp8 GEMM ...
        # ... but every quantized product reads values rounded to fp8, which the audit sees.
        assert variant["dots_with_fp8_sources"] == variant["expected_fp8_gemms"]
        assert len(variant["not_fp8"]) == variant["expected_fp8_gemms"]
    probe = sections["b"]["probe"]
    assert len(probe) == 5 and all(p["status"] == "ok" and p["fp8_gemms"] == 0 for p in probe)

    results = sections["c"]["results"]
    assert [r["name"] for r in results][2:4] == ["bf16", "fp8 e4m3 -> bf16"]
    assert all(r["status"] == "ok" and _number(r["tflops"]) for r in results)
    assert _number(sections["c"]["fp8_over_bf16"])

    assert Path(sections["d"]["results_csv"]).is_file()
    assert [r["recipe"] for r in sections["d"]["rows"]] == ["fp32"]

    out = capsys.readouterr().out
    assert "no accelerator is present" in out
    assert "fp8 / bf16" in out and "fp8-mixed/delayed step HLO" in out


def test_a_failing_section_is_recorded_and_the_run_goes_on(script, tmp_path, monkeypatch, capsys):
    def broken(check, out):
        out["partial"] = 1.5
        raise RuntimeError("no such chip")

    monkeypatch.setattr(script, "section_c", broken)
    monkeypatch.setattr(script, "section_d", lambda check, out: out.update(status="skipped"))
    report = script.main(["--sections", "c,d", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "device_check.json").read_text())
    assert written["complete"] and list(written["sections"]) == ["c", "d"]
    c = written["sections"]["c"]
    assert c["status"] == "error" and c["error"] == "RuntimeError: no such chip"
    assert c["partial"] == 1.5 and "broken" in c["traceback"]
    assert written["sections"]["d"]["status"] == "skipped"
    assert report["sections"]["c"]["status"] == "error"
    assert "no such chip" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(["--sections", "a,x"])


def test_peak_table_knows_the_chips_of_the_issue(script):
    peak = script.peak_bf16_tflops
    assert peak("NVIDIA H200") == peak("NVIDIA H100 80GB HBM3") == 989.0
    assert peak("NVIDIA A100-SXM4-80GB") == 312.0 and peak("NVIDIA A100-PCIE-16GB") == 312.0
    assert peak("TPU v5 lite") == 197.0 and peak("TPU v5") == 459.0 and peak("TPU v4") == 275.0
    assert peak("TPU v6 lite") == 918.0
    assert peak("cpu") is None and peak("TPU v4 lite") is None
    assert script.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
    assert not script.is_oom(ValueError("shapes do not match"))
