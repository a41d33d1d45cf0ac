"""The ``hybrid-jax`` command line: ``train``, ``bench`` and ``inspect``."""

from __future__ import annotations

import argparse
import sys

# Each command arrives with its own issue; until then it says so and fails, so that no script
# mistakes a missing command for a finished run.
_NOT_YET = {
    "train": "trains the bundled GPT on Tiny Shakespeare (arrives with the main-job issue)",
    "bench": "compares precision recipes side by side (arrives with the benchmark issue)",
    "inspect": "shows the precision plan and optimizer groups (arrives with the inspector issue)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid-jax",
        description="Mixed- and low-precision training with hybrid optimizers in JAX.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in _NOT_YET.items():
        commands.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    print(
        f"hybrid-jax {args.command}: not implemented yet. This command {_NOT_YET[args.command]}.",
        file=sys.stderr,
    )
    return 1


def run() -> None:
    """The console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
