"""The console script (train: test_experiment.py, bench: test_bench.py, inspect:
test_inspection.py)."""

import subprocess
import sys

from hybrid_jax.app import cli


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: hybrid-jax" in capsys.readouterr().err


def test_the_installed_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-c", "from hybrid_jax.app.cli import run; run()", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    for command in ("train", "bench", "inspect"):
        assert command in result.stdout
