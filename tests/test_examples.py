"""Every notebook in ``examples/`` runs, cell by cell, in a Jupyter kernel from a fresh clone.

The notebooks are jupytext percent-format ``.py`` files (``# %%`` cells): they diff as code,
open as notebooks in Jupyter (with jupytext) and VS Code, and run as plain scripts. Here each is
read into a notebook and executed by nbclient in an ipykernel, as a user's Jupyter would, so a
cell that raises fails its test, and the tables a cell leaves as its value must render as HTML.
"""

from __future__ import annotations

import pathlib

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("[0-9]*.py"))


def execute(path: pathlib.Path):
    """``path`` run in a fresh kernel whose working directory is ``examples/``."""
    notebook = jupytext.read(path)
    client = nbclient.NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(EXAMPLES)}},
    )
    client.execute()
    return notebook


def html_outputs(notebook) -> list[str]:
    return [
        output["data"]["text/html"]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "text/html" in output.get("data", {})
    ]


def test_examples_exist():
    assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]


# Each notebook starts a kernel and compiles its own small models: 5-20 s each on 2 cores.
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path):
    notebook = execute(path)
    assert html_outputs(notebook), f"{path.name} renders no table as HTML"
