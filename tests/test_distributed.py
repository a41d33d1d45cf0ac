"""Two processes on loopback, JAX's CPU collectives (gloo) standing in for two hosts: they train,
checkpoint, resume, and match one process.

In its own file so that pytest-xdist runs it beside tests/test_sharding.py's 8-device subprocess.
"""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np

from hybrid_jax.app.config import RunConfig
from hybrid_jax.app.run import build

TINY = dict(steps=12, n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path, *extra: str) -> list[str]:
    """`hybrid-jax train` as processes 0 and 1 of one run; their outputs."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    command = [
        sys.executable, "-m", "hybrid_jax.app.cli", "train", *flags, "--eval-interval=6",
        "--eval-batches=1", "--no-progress", "--mesh=data=2", f"--out={tmp_path}",
        f"--coordinator=127.0.0.1:{_free_port()}", "--num-processes=2", *extra,
    ]  # fmt: skip
    # One CPU device each: conftest.py's compiler flags, without any device count.
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", flags)
    # The resuming processes load what the first two compiled from the suite's on-disk cache
    # (conftest.py: JAX_COMPILATION_CACHE_DIR, every program cached).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    procs = [
        subprocess.Popen(
            [*command, f"--process-id={i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output[-3000:]
    assert "final val loss" in outputs[0] and "final val loss" not in outputs[1]  # one writer
    return outputs


def test_two_processes_on_loopback_save_resume_and_match_one_process(tmp_path):
    # Over 10 s: four processes start, import JAX and join the run (about 7 s of CPU each, the
    # resuming two loading their programs from the compilation cache), plus the 1-device run.
    # Steps 0-5, a checkpoint written by both processes, then two new processes resume it.
    _two_processes(tmp_path, "--steps=6")
    outputs = _two_processes(tmp_path, "--resume")
    assert "resumed from step 6" in outputs[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["processes"], summary["devices"]) == (2, 2)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    two = [entry["loss"] for entry in lines if "loss" in entry]

    # The same run in this process, on one device: the same batches, the same steps.
    run = build(RunConfig(**TINY))
    state, one = run.state, []
    for t in range(TINY["steps"]):
        state, metrics = run.step(state, run.sample_train(jax.random.fold_in(run.data_key, t)))
        one.append(float(metrics["loss"]))

    # Two devices sum fp32 partial gradients in another order than one: a few fp32 ulps per
    # step, which 12 steps of Muon and AdamW carry into the loss at the 1e-6 level (as on the
    # 8-device meshes of tests/test_sharding.py); 5e-5 is far below a real fault's 1e-3.
    np.testing.assert_allclose(two, one, rtol=5e-5)
    assert len(two) == TINY["steps"] and one[-1] < one[0] - 1e-3  # it moved: 2.8e-3 (warm-up)
