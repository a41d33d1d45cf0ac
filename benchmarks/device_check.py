"""One run on one accelerator chip: GPT-2 124M speed and MFU, and whether fp8 really runs in fp8.

Written for a few minutes of borrowed H100/H200 or TPU v5e time (under 8 minutes on one chip),
so every section records its error and the run goes on to the next; ``device_check.json`` is
rewritten after every section (and every timed variant), so a run cut short still leaves what
it measured. Progress lines carry the wall-clock time and the seconds since the start.

Sections (``--sections a,b,c,d`` runs a subset):

a. **Train-step time and MFU of GPT-2 124M** (nanoGPT's shape: 12 layers, 12 heads, 768
   channels, context 1024, tied head, vocabulary 50304) built through the app
   (``hybrid_jax.app.run.build(RunConfig(model="gpt2-124m", ...))``, AdamW) for fp32,
   bf16-mixed and fp8-mixed with current and with delayed scaling. Each runs at the largest
   batch of 32, 16 or 8 sequences that fits (an out-of-memory error steps down), on random
   tokens. The step is compiled ahead of time; after warm-up steps, the median of the timed
   steps (each ended by ``jax.block_until_ready``) is reported. Model FLOPs per token are
   nanoGPT's ``estimate_mfu``: ``6 N + 12 L H Q T``, with N **all** parameters (nanoGPT leaves
   the position embedding out of N; here it is in, +0.6% for GPT-2 124M), L layers, H heads,
   Q the head size and T the context. MFU divides the model FLOP/s by the chip's dense bf16
   peak (:data:`PEAK_BF16_TFLOPS`, keyed by ``jax.devices()[0].device_kind``; an unknown kind
   gives no MFU), for every precision alike.
b. **fp8 GEMMs in the optimized HLO** of the fp8-mixed steps (from section a, or compiled here):
   a matmul counts as fp8 when the instruction itself reads two fp8 operands: the cuBLASLt
   ``__cublas$lt$matmul$f8`` custom call on GPUs, a dot on f8 operands on TPUs. Expected: the
   quantized layers (4 per block and the tied head; the position embedding is only looked up)
   x 3 (forward, and the two gradients). The layers whose dots stayed wider are listed with
   the dtypes they read and the dtypes their values come from (the precision audit's
   :func:`~hybrid_jax.diagnostics.dots.hlo_dots`). A **probe** compiles one small matmul,
   forward and backward, in several ways of writing fp8 (the package's, which feeds the codes to
   the dot and divides its output by the scales; dequantizing first, ``convert(q) / scale`` in
   f32 or Flax's ``convert(q) * scale`` in bf16; and a minimal codes-into-the-dot version) and
   counts the fp8 GEMMs of each, to show which pattern XLA rewrites. On an H200 with jaxlib
   0.11.2 only the codes-into-the-dot form became fp8 GEMMs (2026-12-04): the package was
   rewritten to it.
c. **A 4096 x 4096 x 4096 matmul** (``lax.dot_general``, both operands contracted on their
   last axis) in fp32 (default precision and HIGHEST), bf16, and e4m3 x e4m3 with a bf16 and
   an fp32 result: TFLOP/s, share of the bf16 peak, the library call XLA chose, and fp8/bf16.
d. **``hybrid-jax bench --quick``** (every recipe on the small GPT), through
   :func:`hybrid_jax.app.bench.main`: its table and the paths of its CSV and JSON.

Expected on one H200 (and H100 SXM): bf16-mixed MFU >= 40%, and the fp8 matmul >= 1.5x the
bf16 one at 4096^3; the table prints them next to the measurements.

Without an accelerator (``jax.default_backend() == "cpu"``, or ``--toy``) the same code runs at
toy sizes (a 1-layer, 32-channel GPT with context 32 and batch 2, a 128^3 matmul, the bench
with fp32 alone for 4 steps), so that ``tests/test_device_check.py`` keeps it working; the
numbers then say nothing about speed. Run as a script on a CPU, it restarts itself once with
XLA:CPU's cheapest compiler flags (as ``tests/conftest.py`` sets them): about 20 s on two busy
cores instead of 45.

    python benchmarks/device_check.py [--sections a,b,c,d] [--out DIR] [--budget-s 450] [--toy]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    import hybrid_jax
except ImportError:  # run from a checkout that is not installed (the borrowed machine)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import hybrid_jax

from hybrid_jax.app.config import RunConfig, load_precision
from hybrid_jax.app.run import build
from hybrid_jax.diagnostics.dots import hlo_dots
from hybrid_jax.precision import (
    fp8_dot_general,
    fp8_dot_general_delayed,
    fp8_meta,
    plan,
    policies_with_paths,
)
from hybrid_jax.precision.quantize import quantize

SECTIONS = {
    "a": "gpt2-124m train step: time and MFU",
    "b": "fp8 GEMMs in the optimized HLO",
    "c": "matmul: fp32, bf16, fp8",
    "d": "hybrid-jax bench --quick",
}

#: Dense (no sparsity) bf16 peak of one chip in TFLOP/s, by ``jax.devices()[0].device_kind``
#: (vendor datasheets). TPU kinds: v5e reports "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite".
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,  # H200 SXM: the H100's tensor cores
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5": 459.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}

#: What one H100 SXM / H200 should reach (issue 16).
EXPECT_BF16_MFU = 0.40
EXPECT_FP8_OVER_BF16 = 1.5
_EXPECT_KINDS = re.compile(r"NVIDIA H(100 80GB HBM3|200)$")

VARIANTS = (  # (name, precision, fp8_scaling)
    ("fp32", "fp32", "current"),
    ("bf16-mixed", "bf16-mixed", "current"),
    ("fp8-mixed/current", "fp8-mixed", "current"),
    ("fp8-mixed/delayed", "fp8-mixed", "delayed"),
)

GPT2_VOCAB = 50257  # token ids in the random data; a folder without meta gets vocabulary 50304
FP8_GEMM_TARGET = "__cublas$lt$matmul$f8"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between a chip and the CPU smoke run."""

    model_overrides: dict  # RunConfig shape fields over the gpt2-124m preset
    batch_sizes: tuple[int, ...]  # tried largest first
    warmup_steps: int
    timed_steps: int
    train_tokens: int
    val_tokens: int
    matmul: int  # M = N = K
    matmul_repeats: int  # products per timed sample (dispatched back to back)
    matmul_samples: int
    probe_shape: tuple[int, int, int]  # M, K, N of section b's probe
    bench_recipes: str | None  # None: every recipe
    bench_steps: int | None  # None: --quick's


FULL = Sizes(
    model_overrides={},
    batch_sizes=(32, 16, 8),
    warmup_steps=3,
    timed_steps=10,
    train_tokens=1 << 21,
    val_tokens=1 << 16,
    matmul=4096,
    matmul_repeats=20,
    matmul_samples=5,
    probe_shape=(1024, 768, 3072),
    bench_recipes=None,
    bench_steps=None,
)
TOY = Sizes(
    model_overrides=dict(n_layer=1, n_head=2, n_embd=32, block_size=32),
    batch_sizes=(2,),
    warmup_steps=1,
    timed_steps=1,
    train_tokens=1 << 12,
    val_tokens=1 << 10,
    matmul=128,
    matmul_repeats=2,
    matmul_samples=2,
    probe_shape=(64, 32, 48),
    bench_recipes="fp32",
    bench_steps=4,
)


# --- bookkeeping ------------------------------------------------------------------------------


class Check:
    """The run's state: options, sizes, the JSON being built, and what sections share."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, toy: bool):
        self.args, self.sizes, self.toy = args, sizes, toy
        self.start = time.perf_counter()
        self.out = Path(args.out)
        self.json_path = self.out / "device_check.json"
        self.hlo: dict[str, dict] = {}  # fp8 variant -> its step's HLO text, params, batch
        self.data: dict | None = None
        self.tmp = tempfile.TemporaryDirectory(prefix="device_check_")
        device = jax.devices()[0]
        kind = device.device_kind
        self.peak = peak_bf16_tflops(kind)
        self.report: dict[str, Any] = {
            "schema": "hybrid_jax.device_check/1",
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_s": None,
            "complete": False,
            "env": {
                "backend": jax.default_backend(),
                "accelerator": jax.default_backend() != "cpu",
                "device_kind": kind,
                "device_count": jax.device_count(),
                "peak_bf16_tflops": self.peak,
                "toy_sizes": toy,
                "jax": jax.__version__,
                "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
                "flax": _version("flax"),
                "optax": _version("optax"),
                "python": platform.python_version(),
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "hybrid_jax": getattr(hybrid_jax, "__version__", None),
            },
            "args": dict(vars(args)),
            "sizes": dataclasses.asdict(sizes),
            "expect": {
                "bf16_mixed_mfu_min": EXPECT_BF16_MFU,
                "fp8_over_bf16_matmul_min": EXPECT_FP8_OVER_BF16,
                "applies": bool(_EXPECT_KINDS.match(kind)),
                "note": "issue 16's expectations for one H100 SXM or H200",
            },
            "sections": {
                name: {"status": "pending", "title": SECTIONS[name]} for name in args.sections
            },
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return math.inf if self.args.budget_s is None else self.args.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        now = datetime.datetime.now().strftime("%H:%M:%S")
        print(f"[{now} +{self.elapsed():6.1f}s] {message}", flush=True)

    def save(self) -> None:
        self.report["wall_s"] = round(self.elapsed(), 2)
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_jsonable(self.report), indent=1, allow_nan=False) + "\n")
        os.replace(tmp, self.json_path)


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # a version is nice to have
        return None


def _jsonable(x: Any) -> Any:
    """Plain JSON: NumPy scalars as numbers, NaN and infinities as null, tuples as lists."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 1500 else text[:1500] + " ..."


def peak_bf16_tflops(device_kind: str) -> float | None:
    """The chip's dense bf16 peak in TFLOP/s, or None for an unknown kind (and CPUs).

    Examples:
      >>> peak_bf16_tflops("NVIDIA H200"), peak_bf16_tflops("TPU v5 lite"), peak_bf16_tflops("cpu")
      (989.0, 197.0, None)
    """
    if device_kind in PEAK_BF16_TFLOPS:
        return PEAK_BF16_TFLOPS[device_kind]
    if device_kind.startswith("NVIDIA A100"):
        return 312.0
    return None


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error of XLA (``XlaRuntimeError: RESOURCE_EXHAUSTED``), at compile
    time or at run time."""
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _free() -> None:
    """Drops what the last run left on the device: its buffers go with their last reference.
    (Not ``jax.clear_caches()``: every build would then recompile the GPT's initialisers.)"""
    gc.collect()


# --- data -------------------------------------------------------------------------------------


def make_data(check: Check) -> dict:
    """A token folder in nanoGPT's format: ``train.bin`` and ``val.bin`` of random uint16 ids
    below GPT-2's 50257, and no ``meta``, so the vocabulary is GPT-2's padded 50304."""
    if check.data is None:
        rng = np.random.default_rng(0)
        folder = Path(check.tmp.name) / "tokens"
        folder.mkdir(exist_ok=True)
        for name, n in (
            ("train.bin", check.sizes.train_tokens),
            ("val.bin", check.sizes.val_tokens),
        ):
            rng.integers(0, GPT2_VOCAB, n, dtype=np.uint16).tofile(folder / name)
        check.data = {"path": str(folder), "kind": "token folder: random uint16, no meta"}
    return check.data


def run_config(check: Check, precision: str, fp8_scaling: str, batch_size: int) -> RunConfig:
    return RunConfig(
        model="gpt2-124m",
        precision=precision,
        fp8_scaling=fp8_scaling,
        batch_size=batch_size,
        optimizer="adamw",
        data=make_data(check)["path"],
        eval_batches=1,
        steps=1000,  # the schedule's length; only a few steps run
        warmup_steps=10,
        seed=0,
        **check.sizes.model_overrides,
    )


def model_flops_per_token(config: RunConfig, n_params: int) -> int:
    """nanoGPT's ``estimate_mfu``: ``6 N + 12 L H Q T`` with N all parameters (module doc)."""
    config, _ = config.resolved()
    q = config.n_embd // config.n_head
    return 6 * n_params + 12 * config.n_layer * config.n_head * q * config.block_size


# --- a: step time and MFU ---------------------------------------------------------------------


def section_a(check: Check, out: dict) -> None:
    out["flops_formula"] = (
        "6*N + 12*L*H*Q*T per token (nanoGPT estimate_mfu), N = all parameters incl. the "
        "position embedding; MFU over the dense bf16 peak for every precision"
    )
    out["peak_bf16_tflops"] = check.peak
    out["data"] = make_data(check)
    out["runs"] = runs = []
    for name, precision, scaling in VARIANTS:
        if check.remaining() < 60:
            runs.append({"variant": name, "status": "skipped", "reason": "time budget spent"})
            check.log(f"  {name}: skipped, time budget spent")
            continue
        record = {"variant": name, "precision": precision, "fp8_scaling": scaling}
        runs.append(record)
        record["oom_batch_sizes"] = []
        for batch_size in check.sizes.batch_sizes:
            _free()  # here, not in `except`: the traceback there still holds the last run
            try:
                record.update(time_variant(check, name, precision, scaling, batch_size))
                record["status"] = "ok"
                break
            except Exception as e:  # recorded, and the next variant runs
                if is_oom(e):
                    record["oom_batch_sizes"].append(batch_size)
                    check.log(f"  {name}: out of memory at batch {batch_size}, stepping down")
                    continue
                record.update(status="error", batch_size=batch_size, error=_error(e))
                record["traceback"] = traceback.format_exc()[-3000:]
                check.log(f"  {name}: error at batch {batch_size}: {_error(e)[:300]}")
                break
        else:
            record.update(status="error", error="out of memory at every batch size tried")
        _free()
        check.save()
    ok = [r for r in runs if r.get("status") == "ok"]
    out["status"] = "ok" if ok and len(ok) == len(runs) else ("partial" if ok else "error")
    if not ok:
        out["error"] = "no variant ran: " + "; ".join(
            f"{r['variant']}: {r.get('error') or r.get('reason')}" for r in runs
        )


def time_variant(check: Check, name: str, precision: str, scaling: str, batch_size: int) -> dict:
    sizes = check.sizes
    check.log(f"  {name}: building at batch {batch_size}")
    config = run_config(check, precision, scaling, batch_size)
    run = build(config)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.state.params))
    n_batches = min(4, sizes.warmup_steps + sizes.timed_steps)
    batches = [run.sample_train(jax.random.fold_in(run.data_key, i)) for i in range(n_batches)]
    start = time.perf_counter()
    compiled = run.step.lower(run.state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    check.log(f"  {name}: compiled in {compile_s:.1f} s")
    if precision == "fp8-mixed":  # section b reads it
        check.hlo[name] = {
            "text": compiled.as_text(),
            "params": _shapes(run.state.params),
            "precision": config.precision,
            "batch_size": batch_size,
        }
    analysis = compiled.memory_analysis()
    state, times, skipped = run.state, [], 0
    for i in range(sizes.warmup_steps + sizes.timed_steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batches[i % n_batches])
        jax.block_until_ready(state)
        if i >= sizes.warmup_steps:
            times.append(time.perf_counter() - t0)
            skipped += int(metrics["skipped"])
    loss = float(metrics["loss"])
    step_s = float(np.median(times))
    resolved, _ = config.resolved()
    tokens = batch_size * resolved.block_size
    flops_per_token = model_flops_per_token(config, n_params)
    tflops = flops_per_token * tokens / step_s / 1e12
    mfu = tflops / check.peak if check.peak else None
    del state, compiled, run, batches, metrics
    result = dict(
        batch_size=batch_size,
        block_size=resolved.block_size,
        tokens_per_step=tokens,
        n_params=n_params,
        flops_per_token=flops_per_token,
        compile_s=compile_s,
        step_ms=step_s * 1e3,
        step_ms_min=min(times) * 1e3,
        step_ms_max=max(times) * 1e3,
        timed_steps=len(times),
        tokens_per_s=tokens / step_s,
        model_tflops=tflops,
        mfu=mfu,
        temp_bytes=getattr(analysis, "temp_size_in_bytes", None),
        argument_bytes=getattr(analysis, "argument_size_in_bytes", None),
        final_loss=loss,
        skipped_steps=skipped,
    )
    mfu_text = "n/a" if mfu is None else f"{mfu:.1%}"
    check.log(
        f"  {name}: batch {batch_size}x{resolved.block_size}: {step_s * 1e3:.2f} ms/step, "
        f"{tokens / step_s:,.0f} tokens/s, {tflops:.1f} TFLOP/s, MFU {mfu_text}"
    )
    return result


def _shapes(tree: Any) -> Any:
    """``tree`` without its buffers (the step donates them): what a precision plan needs."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


# --- b: fp8 GEMMs in the HLO ------------------------------------------------------------------


def _is_f8(dtype: Any) -> bool:
    return dtype is not None and np.dtype(dtype).name.startswith("float8")


def _short(dtype: Any) -> str:
    if dtype is None:
        return "?"
    name = np.dtype(dtype).name
    return {
        "float32": "f32",
        "bfloat16": "bf16",
        "float16": "f16",
        "float8_e4m3fn": "e4m3",
        "float8_e5m2": "e5m2",
    }.get(name, name)


def quantized_layers(params: Any, precision: str) -> list[str]:
    """The GPT's layers that multiply in fp8 under ``precision``: those of a ``kernel`` (every
    Linear) and the tied head (``tok_embed``); the position embedding is only looked up."""
    layers = []
    for path, policy in policies_with_paths(plan(params, load_precision(precision))):
        layer, _, weight = path.rpartition("/")
        if _is_f8(policy.compute_dtype) and (weight == "kernel" or path == "tok_embed/embedding"):
            layers.append(layer)
    return layers


def count_fp8(text: str, layers: list[str]) -> dict:
    """fp8 GEMMs of an optimized HLO module, per quantized layer and pass."""
    dots = hlo_dots(text, layers=layers)
    per_layer = {layer: {"forward": [0, 0], "backward": [0, 0]} for layer in layers}
    not_fp8, kinds = [], {}
    for dot in dots:
        fp8 = all(_is_f8(d) for d in dot.operand_dtypes)
        kind = f"{dot.opcode} {' x '.join(_short(d) for d in dot.operand_dtypes)}"
        kinds[kind] = kinds.get(kind, 0) + 1
        if dot.layer not in per_layer or dot.pass_ not in ("forward", "backward"):
            continue
        counts = per_layer[dot.layer][dot.pass_]
        counts[0] += fp8
        counts[1] += 1
        if not fp8:
            not_fp8.append(
                {
                    "layer": dot.layer,
                    "pass": dot.pass_,
                    "opcode": dot.opcode,
                    "operands": " x ".join(_short(d) for d in dot.operand_dtypes),
                    "sources": " x ".join(_short(d) for d in dot.source_dtypes),
                    "result": _short(dot.result_dtype),
                }
            )
    fp8_layer_dots = sum(c[p][0] for c in per_layer.values() for p in c)
    source_fp8 = sum(
        1 for dot in dots if dot.layer in per_layer and all(_is_f8(d) for d in dot.source_dtypes)
    )
    return dict(
        dots_total=len(dots),
        dot_kinds=kinds,
        fp8_gemms=sum(all(_is_f8(d) for d in dot.operand_dtypes) for dot in dots),
        fp8_gemms_in_quantized_layers=fp8_layer_dots,
        dots_in_quantized_layers=sum(c[p][1] for c in per_layer.values() for p in c),
        dots_with_fp8_sources=source_fp8,
        fp8_custom_calls=text.count(f'custom_call_target="{FP8_GEMM_TARGET}"'),
        per_layer={
            k: {p: {"fp8": c[0], "dots": c[1]} for p, c in v.items()} for k, v in per_layer.items()
        },
        not_fp8=not_fp8,
    )


def section_b(check: Check, out: dict) -> None:
    out["rule"] = (
        "an fp8 GEMM is a product whose instruction reads two fp8 operands (GPU: the "
        f"{FP8_GEMM_TARGET} custom call; TPU: a dot on f8 operands); expected = quantized layers "
        "x 3 (forward, input gradient, weight gradient)"
    )
    out["variants"] = variants = []
    for name, precision, scaling in VARIANTS:
        if precision != "fp8-mixed":
            continue
        record = {"variant": name}
        variants.append(record)
        try:
            source = check.hlo.get(name)
            if source is None:
                check.log(f"  {name}: compiling the train step (section a did not)")
                source = compile_only(check, precision, scaling)
            record["batch_size"] = source["batch_size"]
            record["hlo_from"] = source.get("from", "section a")
            layers = quantized_layers(source["params"], source["precision"])
            found = count_fp8(source["text"], layers)
            expected = 3 * len(layers)
            record.update(found, quantized_layers=len(layers), expected_fp8_gemms=expected)
            record["verdict"] = _verdict(found, expected, check)
            record["status"] = "ok"
            check.log(
                f"  {name}: {found['fp8_gemms_in_quantized_layers']} fp8 GEMMs of {expected} "
                f"expected ({found['dots_in_quantized_layers']} dots in the quantized layers); "
                f"{record['verdict']}"
            )
            for row in found["not_fp8"][:6]:
                check.log(
                    f"    not fp8: {row['layer']} {row['pass']}: {row['opcode']} reads "
                    f"{row['operands']} (values from {row['sources']})"
                )
        except Exception as e:
            record.update(status="error", error=_error(e), traceback=traceback.format_exc()[-3000:])
            check.log(f"  {name}: error: {_error(e)[:300]}")
        check.save()
    check.hlo.clear()
    _free()
    try:
        out["probe"] = probe_patterns(check)
    except Exception as e:
        out["probe"] = {"status": "error", "error": _error(e)}
        check.log(f"  probe: error: {_error(e)[:300]}")
    statuses = [v.get("status") for v in variants]
    out["status"] = "ok" if all(s == "ok" for s in statuses) else "error"
    if out["status"] == "error":
        out["error"] = "; ".join(
            f"{v['variant']}: {v.get('error')}" for v in variants if v.get("error")
        )


def _verdict(found: dict, expected: int, check: Check) -> str:
    n = found["fp8_gemms_in_quantized_layers"]
    backend = jax.default_backend()
    if backend == "cpu":
        return (
            f"cpu has no fp8 GEMM (0 by construction); {found['dots_with_fp8_sources']} dots "
            "read values dequantized from fp8, the pattern a GPU compiler would have to match"
        )
    if check.toy:
        return (
            f"{n} of {expected} (toy sizes: XLA may leave such small products to its own "
            "emitters whatever the pattern; the probe below is full size)"
        )
    if n >= expected:
        return "every quantized matmul runs as an fp8 GEMM"
    if n == 0:
        return (
            "no fp8 GEMM: XLA kept the quantize-dequantize pattern as wide dots (the probe "
            "below shows which way of writing it XLA rewrites)"
        )
    return f"partly: {expected - n} quantized matmuls stayed wide"


def compile_only(check: Check, precision: str, scaling: str) -> dict:
    batch_size = check.sizes.batch_sizes[-1]
    config = run_config(check, precision, scaling, batch_size)
    run = build(config)
    batch = run.sample_train(jax.random.fold_in(run.data_key, 0))
    text = run.step.lower(run.state, batch).compile().as_text()
    return {
        "text": text,
        "params": _shapes(run.state.params),
        "precision": config.precision,
        "batch_size": batch_size,
        "from": "compiled in section b",
    }


# The probe: one matmul (x @ w, bf16 in and out, as a bf16-mixed Linear) written in several ways.
_DIMS = (((1,), (0,)), ((), ()))
_F32, _BF16 = jnp.float32, jnp.bfloat16
_E4M3, _E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def _make_qdq(dequantize_to, use_multiply):
    """A custom-VJP fp8 matmul in the quantize-dequantize style: operands (forward) and the
    incoming gradient (backward) are rounded to fp8 and dequantized right before each dot."""

    def dequant(x, dtype):
        q, scale = quantize(x, dtype)
        if use_multiply:  # Flax's fp8_ops: convert(q) * (1/scale) in the compute dtype
            return q.astype(dequantize_to) * (1 / scale).astype(dequantize_to)
        return (q.astype(_F32) / scale).astype(dequantize_to)

    def dot(a, b, dims=_DIMS):
        return jax.lax.dot_general(a, b, dims, preferred_element_type=_F32)

    @jax.custom_vjp
    def matmul(x, w):
        return dot(dequant(x, _E4M3), dequant(w, _E4M3)).astype(x.dtype)

    def fwd(x, w):
        xd, wd = dequant(x, _E4M3), dequant(w, _E4M3)
        return dot(xd, wd).astype(x.dtype), (xd, wd)

    def bwd(res, g):
        xd, wd = res
        gd = dequant(g, _E5M2)
        dx = dot(gd, wd, (((1,), (1,)), ((), ())))
        dw = dot(xd, gd, (((0,), (0,)), ((), ())))
        return dx.astype(_BF16), dw.astype(_BF16)

    matmul.defvjp(fwd, bwd)
    return matmul


def _direct(x, w):
    """fp8 codes fed to the dot itself (Flax's Fp8DirectDotGeneralOp), scales applied after."""

    @jax.custom_vjp
    def matmul(x, w):
        return fwd(x, w)[0]

    def fwd(x, w):
        xq, xs = quantize(x, _E4M3)
        wq, ws = quantize(w, _E4M3)
        y = jax.lax.dot_general(xq, wq, _DIMS, preferred_element_type=_BF16)
        return (y.astype(_F32) / (xs * ws)).astype(x.dtype), (xq, xs, wq, ws)

    def bwd(res, g):
        xq, xs, wq, ws = res
        gq, gs = quantize(g, _E5M2)
        dx = jax.lax.dot_general(gq, wq, (((1,), (1,)), ((), ())), preferred_element_type=_BF16)
        dw = jax.lax.dot_general(xq, gq, (((0,), (0,)), ((), ())), preferred_element_type=_BF16)
        return (
            (dx.astype(_F32) / (gs * ws)).astype(_BF16),
            (dw.astype(_F32) / (xs * gs)).astype(_BF16),
        )

    matmul.defvjp(fwd, bwd)
    return matmul(x, w)


def probe_patterns(check: Check) -> list[dict]:
    m, k, n = check.sizes.probe_shape
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (m, k), _F32).astype(_BF16)
    w = (jax.random.normal(key_w, (k, n), _F32) * 0.02).astype(_BF16)
    meta = fp8_meta(16)
    cases: dict[str, Callable] = {
        "package fp8_dot_general (current)": lambda x, w: fp8_dot_general(x, w, _DIMS),
        "package fp8_dot_general_delayed": None,  # below: it also differentiates the meta
        "dequantize then dot: convert(q) / scale in f32": _make_qdq(_F32, use_multiply=False),
        "Flax-style qdq: convert(q) * scale in bf16": _make_qdq(_BF16, use_multiply=True),
        "direct: dot on f8 operands, scales after": _direct,
    }
    results = []
    for name, fn in cases.items():
        record = {"pattern": name, "expected_fp8_gemms": 3}
        results.append(record)
        try:
            if fn is None:

                def loss(x, w, meta):
                    y = fp8_dot_general_delayed(x, w, _DIMS, meta=meta)
                    return jnp.sum(y.astype(_F32))

                step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
                args = (x, w, meta)
            else:

                def loss(x, w, fn=fn):
                    return jnp.sum(fn(x, w).astype(_F32))

                step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
                args = (x, w)
            compiled = step.lower(*args).compile()
            text = compiled.as_text()
            jax.block_until_ready(compiled(*args))  # it runs, too
            dots = hlo_dots(text)
            record.update(
                status="ok",
                fp8_gemms=sum(all(_is_f8(d) for d in dot.operand_dtypes) for dot in dots),
                dots=[
                    f"{dot.opcode} {' x '.join(_short(d) for d in dot.operand_dtypes)} -> "
                    f"{_short(dot.result_dtype)}"
                    for dot in dots
                ],
                fp8_custom_calls=text.count(f'custom_call_target="{FP8_GEMM_TARGET}"'),
            )
            check.log(f"  probe {name}: {record['fp8_gemms']} fp8 GEMMs of 3; {record['dots']}")
        except Exception as e:
            record.update(status="error", error=_error(e))
            check.log(f"  probe {name}: error: {_error(e)[:300]}")
    return results


# --- c: matmul --------------------------------------------------------------------------------


def section_c(check: Check, out: dict) -> None:
    size, sizes = check.sizes.matmul, check.sizes
    out["shape"] = [size, size, size]
    out["layout"] = "a[M,K] . b[N,K] contracted on K (both K-major, cuBLASLt fp8's TN layout)"
    key_a, key_b = jax.random.split(jax.random.key(0))
    a32 = jax.random.normal(key_a, (size, size), _F32)
    b32 = jax.random.normal(key_b, (size, size), _F32)
    highest = jax.lax.Precision.HIGHEST
    cases = (  # name, operand dtype, result dtype, precision
        ("fp32", _F32, _F32, None),
        ("fp32 HIGHEST", _F32, _F32, highest),
        ("bf16", _BF16, _BF16, None),
        ("fp8 e4m3 -> bf16", _E4M3, _BF16, None),
        ("fp8 e4m3 -> f32", _E4M3, _F32, None),
    )
    out["results"] = results = []
    flops = 2 * size**3
    for name, dtype, result_dtype, precision in cases:
        record = {"name": name}
        results.append(record)
        try:
            a, b = a32.astype(dtype), b32.astype(dtype)

            def product(a, b, result_dtype=result_dtype, precision=precision):
                return jax.lax.dot_general(
                    a,
                    b,
                    (((1,), (1,)), ((), ())),
                    precision=precision,
                    preferred_element_type=result_dtype,
                )

            compiled = jax.jit(product).lower(a, b).compile()
            text = compiled.as_text()
            for _ in range(3):
                jax.block_until_ready(compiled(a, b))
            samples = []
            for _ in range(sizes.matmul_samples):
                t0 = time.perf_counter()
                for _ in range(sizes.matmul_repeats):
                    y = compiled(a, b)
                jax.block_until_ready(y)
                samples.append((time.perf_counter() - t0) / sizes.matmul_repeats)
            seconds = float(np.median(samples))
            tflops = flops / seconds / 1e12
            targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
            record.update(
                status="ok",
                ms=seconds * 1e3,
                tflops=tflops,
                of_bf16_peak=tflops / check.peak if check.peak else None,
                library_calls=targets,
                fp8_gemm=FP8_GEMM_TARGET in targets
                or any(all(_is_f8(d) for d in dot.operand_dtypes) for dot in hlo_dots(text)),
            )
            check.log(f"  {name}: {seconds * 1e3:.3f} ms, {tflops:.1f} TFLOP/s {targets}")
        except Exception as e:
            record.update(status="error", error=_error(e))
            check.log(f"  {name}: error: {_error(e)[:300]}")
    by_name = {r["name"]: r for r in results if r.get("status") == "ok"}
    if "bf16" in by_name and "fp8 e4m3 -> bf16" in by_name:
        out["fp8_over_bf16"] = by_name["fp8 e4m3 -> bf16"]["tflops"] / by_name["bf16"]["tflops"]
    ok = len(by_name)
    out["status"] = "ok" if ok == len(results) else ("partial" if ok else "error")
    if not ok:
        out["error"] = "; ".join(f"{r['name']}: {r.get('error')}" for r in results)


# --- d: the bench -----------------------------------------------------------------------------


def section_d(check: Check, out: dict) -> None:
    from hybrid_jax.app import bench

    if check.remaining() < 120:
        out.update(status="skipped", reason="time budget spent (needs about 2 minutes)")
        return
    sizes = check.sizes
    folder = check.out / "bench-quick"
    out["command"] = "hybrid-jax bench --quick" + (
        f" --recipes {sizes.bench_recipes} --steps {sizes.bench_steps}" if check.toy else ""
    )
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        check.log(f"  bench: {line}")

    rows = bench.main(
        sizes.bench_recipes, quick=True, steps=sizes.bench_steps, out=str(folder), log=log
    )
    out.update(
        status="ok",
        out=str(folder),
        results_csv=str(folder / "results.csv"),
        results_json=str(folder / "results.json"),
        table=str(bench.table(rows)),
        rows=[
            {
                k: row.get(k)
                for k in (
                    "recipe",
                    "step_time_ms",
                    "step_time_ratio_vs_fp32",
                    "tokens_per_s",
                    "compile_s",
                    "final_val_loss",
                    "val_loss_gap_pct",
                    "diverged",
                )
            }
            for row in rows
        ],
    )


# --- the table --------------------------------------------------------------------------------


def _tflops(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def _f(x: Any, spec: str, missing: str = "n/a") -> str:
    return (
        missing if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)
    )


def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """``(section, item, measured, expected)`` rows of the printed table."""
    applies = report["expect"]["applies"]
    where = "" if applies else " (H100/H200)"
    rows = []
    for key, section in report["sections"].items():
        detail = _ROWS[key](section, where)
        if section.get("status") not in ("ok", "partial") or not detail:
            why = section.get("error") or section.get("reason") or ""
            rows.append((key, SECTIONS[key], str(section.get("status")), _clip(why, 70)))
        rows.extend((key, *row) for row in detail)
    return rows


def _clip(text: Any, n: int = 50) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _failed(record: dict) -> str:
    return f"{record.get('status')}: {_clip(record.get('error') or record.get('reason'))}"


def _rows_a(section: dict, where: str) -> list[tuple[str, str, str]]:
    rows = []
    for run in section.get("runs", []):
        if run.get("status") != "ok":
            rows.append((run["variant"], _failed(run), ""))
            continue
        measured = (
            f"B={run['batch_size']}x{run['block_size']}  {run['step_ms']:.1f} ms  "
            f"{run['tokens_per_s']:,.0f} tok/s  {_tflops(run['model_tflops'])} TFLOP/s  "
            f"MFU {_f(run['mfu'], '.1%')}"
        )
        expected = f">= {EXPECT_BF16_MFU:.0%} MFU{where}" if run["variant"] == "bf16-mixed" else ""
        rows.append((run["variant"], measured, expected))
    return rows


def _rows_b(section: dict, where: str) -> list[tuple[str, str, str]]:
    del where
    rows = []
    for v in section.get("variants", []):
        if v.get("status") != "ok":
            rows.append((f"{v['variant']} step HLO", _failed(v), ""))
            continue
        wide = len({r["layer"] for r in v["not_fp8"]})
        measured = (
            f"{v['fp8_gemms_in_quantized_layers']} fp8 GEMMs of "
            f"{v['dots_in_quantized_layers']} dots ({v['fp8_gemms']} in all); {wide} of "
            f"{v['quantized_layers']} layers with wide dots"
        )
        rows.append((f"{v['variant']} step HLO", measured, f"{v['expected_fp8_gemms']} fp8"))
    probe = section.get("probe")
    for p in probe if isinstance(probe, list) else []:
        measured = (
            f"{p['fp8_gemms']} fp8 GEMMs of {len(p['dots'])} dots"
            if p.get("status") == "ok"
            else _failed(p)
        )
        rows.append((f"probe: {p['pattern']}", measured, "3 fp8"))
    if isinstance(probe, dict):
        rows.append(("probe", _failed(probe), ""))
    return rows


def _rows_c(section: dict, where: str) -> list[tuple[str, str, str]]:
    rows = []
    for r in section.get("results", []):
        if r.get("status") != "ok":
            rows.append((f"{section['shape'][0]}^3 {r['name']}", _failed(r), ""))
            continue
        peak = f" ({r['of_bf16_peak']:.0%} of bf16 peak)" if r.get("of_bf16_peak") else ""
        rows.append(
            (f"{section['shape'][0]}^3 {r['name']}", f"{_tflops(r['tflops'])} TFLOP/s{peak}", "")
        )
    if section.get("results"):
        ratio = section.get("fp8_over_bf16")
        rows.append(("fp8 / bf16", f"{_f(ratio, '.2f')}x", f">= {EXPECT_FP8_OVER_BF16}x{where}"))
    return rows


def _rows_d(section: dict, where: str) -> list[tuple[str, str, str]]:
    del where
    if section.get("status") != "ok":
        return []
    steps = ", ".join(
        f"{r['recipe']} {_f(r['step_time_ms'], '.2f')} ms" for r in section.get("rows", [])[:4]
    )
    more = len(section.get("rows", [])) - 4
    return [
        (section["command"], steps + (f", ... (+{more})" if more > 0 else ""), ""),
        ("results.csv", section["results_csv"], ""),
    ]


_ROWS = {"a": _rows_a, "b": _rows_b, "c": _rows_c, "d": _rows_d}


def print_table(report: dict) -> None:
    env = report["env"]
    print()
    print(
        f"device check: backend={env['backend']} device={env['device_kind']} "
        f"x{env['device_count']} jax={env['jax']} peak bf16="
        f"{_f(env['peak_bf16_tflops'], '.0f')} TFLOP/s wall={report['wall_s']:.0f} s"
        + (" (toy sizes: no accelerator)" if env["toy_sizes"] else "")
    )
    rows = [("", "item", "measured", "expected"), *summary_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
        if i == 0:
            print("  ".join("-" * width for width in widths))


# --- main -------------------------------------------------------------------------------------


def _sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown sections {unknown}; choose from {','.join(SECTIONS)}"
        )
    return names


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections", type=_sections, default=list(SECTIONS), help="comma-separated: a,b,c,d"
    )
    parser.add_argument(
        "--out", default=".", help="folder for device_check.json (and bench-quick/)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting new work after this many seconds (default: 450 on an accelerator)",
    )
    parser.add_argument(
        "--toy", action="store_true", help="toy sizes even on an accelerator (a smoke run)"
    )
    args = parser.parse_args(argv)
    toy = args.toy or jax.default_backend() == "cpu"
    if args.budget_s is None and not toy:
        args.budget_s = 450.0
    sizes = FULL
    if toy:
        # A smoke run on an accelerator keeps the probe's full-size matmul: XLA leaves tiny
        # products to its own emitters, which would hide whether the fp8 pattern is matched.
        accelerator = jax.default_backend() != "cpu"
        sizes = dataclasses.replace(TOY, probe_shape=FULL.probe_shape) if accelerator else TOY
    check = Check(args, sizes, toy)
    env = check.report["env"]
    check.log(
        f"device check: backend {env['backend']}, {env['device_count']} x {env['device_kind']}, "
        f"jax {env['jax']}, sections {','.join(args.sections)} -> {check.json_path}"
    )
    if jax.default_backend() == "cpu":
        check.log("no accelerator is present: the same code paths at toy sizes (no speed claims)")
    check.save()
    functions = {"a": section_a, "b": section_b, "c": section_c, "d": section_d}
    previous = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):  # not the main thread: no handler, no harm
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        for name in args.sections:
            out = check.report["sections"][name]
            out["status"] = "running"
            check.log(f"section {name}: {SECTIONS[name]}")
            start = time.perf_counter()
            try:
                functions[name](check, out)
            except Exception as e:  # recorded; the next section runs
                out.update(
                    status="error", error=_error(e), traceback=traceback.format_exc()[-3000:]
                )
                check.log(f"section {name}: error: {_error(e)[:500]}")
            out["seconds"] = round(time.perf_counter() - start, 2)
            check.log(f"section {name}: {out['status']} in {out['seconds']:.1f} s")
            check.save()
        check.report["complete"] = True
    except BaseException as e:
        check.report["interrupted"] = _error(e)
        raise
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)
        check.save()
        check.tmp.cleanup()
        print_table(check.report)
        print(f"wrote {check.json_path}")
    return check.report


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


_CPU_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _restart_with_fast_cpu_compiles() -> None:
    """Without an accelerator, starts this script again once with XLA:CPU's cheapest compiler
    settings (tests/conftest.py's): the toy run makes no speed claims and is mostly compiling
    (about 45 s become 20 s on 2 busy cores). XLA reads the flags when the backend starts, so
    it takes a new process; never on a GPU or TPU, whose kernels those flags would slow."""
    flags = os.environ.get("XLA_FLAGS", "")
    if jax.default_backend() != "cpu" or "--xla_backend_optimization_level" in flags:
        return
    env = dict(os.environ, XLA_FLAGS=f"{flags} {_CPU_FAST_COMPILE}".strip())
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":
    _restart_with_fast_cpu_compiles()
    main()
