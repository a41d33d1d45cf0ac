"""The package's import graph: it points downward, has no circle, and the library stays apart
from the applications (``hybrid_jax.app``) and from Flax."""

import ast
import pathlib
import subprocess
import sys

import pytest

import hybrid_jax

_ROOT = pathlib.Path(hybrid_jax.__file__).parent
# Where Flax may be imported: the models, and the applications that build them.
_FLAX_ALLOWED = ("hybrid_jax.models", "hybrid_jax.app")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in it (lazy imports count too): for
    ``from a import b`` the module ``a.b`` when there is one, else ``a``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            names = [n for n in names[:-1] if n in modules] or [node.module]
        else:
            continue
        found.update(name for name in names if name.startswith("hybrid_jax"))
    return found


def _graph() -> dict[str, set[str]]:
    paths = sorted(_ROOT.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) & modules for p in paths}


def _external_imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` (a package's ``__init__`` importing its own modules does not
    count as importing itself), or ``None``."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt == node:
                continue
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_circle():
    graph = _graph()
    assert len(graph) > 40  # the walk found the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_circle_is_found_when_there_is_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]


def test_the_library_never_imports_the_apps():
    offenders = {
        (module, imported)
        for module, imports in _graph().items()
        if not module.startswith("hybrid_jax.app")
        for imported in imports
        if imported.startswith("hybrid_jax.app")
    }
    assert not offenders, sorted(offenders)


@pytest.mark.parametrize("module", sorted(_graph()))
def test_flax_only_in_models_and_apps(module):
    if module.startswith(_FLAX_ALLOWED):
        return
    path = _ROOT.parent.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    assert "flax" not in _external_imports(path), f"{module} imports flax"


def test_importing_the_library_loads_no_flax_and_no_orbax():
    # Flax belongs to the models, orbax to the runs that checkpoint: a user of the pytree API
    # pays for neither.
    code = (
        "import sys, hybrid_jax; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'flax', 'orbax'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
