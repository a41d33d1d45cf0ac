"""The console script: commands not built yet say so and fail (train: test_experiment.py,
bench: test_bench.py)."""

import subprocess
import sys

import pytest

from hybrid_jax import cli


@pytest.mark.parametrize("command", ["inspect"])
def test_commands_not_built_yet_fail_with_a_clear_message(command, capsys):
    assert cli.main([command]) == 1
    assert f"hybrid-jax {command}: not implemented yet" in capsys.readouterr().err


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: hybrid-jax" in capsys.readouterr().err


def test_the_installed_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-c", "from hybrid_jax.cli import run; run()", "inspect"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1 and "not implemented yet" in result.stderr
