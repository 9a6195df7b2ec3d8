"""The import graph, read from the source with `ast` (nothing is imported): crrf_jax/ has no cycle, and the
config files stay cheap to import.

Every import statement counts, at module level or inside a function: a cycle through a lazy import is still
two modules that cannot be understood (or moved) one without the other.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "crrf_jax"


def module_name(path: Path) -> str:
    """crrf_jax/data/sen12mscr.py -> crrf_jax.data.sen12mscr; crrf_jax/data/__init__.py -> crrf_jax.data."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """Every import statement of a file as (module, names): `import a.b` gives ("a.b", ()), `from a import b,
    c` gives ("a", ("b", "c")). Relative imports are resolved against the file's package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{module}" if module else base
            found.append((module, tuple(alias.name for alias in node.names)))
    return found


def import_graph() -> dict[str, set[str]]:
    """crrf_jax module -> the crrf_jax modules it imports (`from crrf_jax.data import sen12mscr` is an edge to
    crrf_jax.data.sen12mscr, `from crrf_jax.tiling import pad_to` one to crrf_jax.tiling)."""
    files = {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        targets = set()
        for module, names in imports(path):
            submodules = {f"{module}.{n}" for n in names} & files.keys()
            targets |= submodules
            if module in files and (not names or len(submodules) < len(names)):
                targets.add(module)
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search)."""
    done, path = set(), []
    on_path: set[str] = set()

    def visit(node):
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph[node]):
            if nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        on_path.discard(path.pop())
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read():
    graph = import_graph()
    assert {"crrf_jax.bundle", "crrf_jax.rundir"} <= graph["crrf_jax.inference"]
    assert "crrf_jax.data.contract" in graph["crrf_jax.predict"]  # `from crrf_jax.data import contract`
    assert "crrf_jax.models.autoencoder" in graph["crrf_jax.models.build"]  # an import inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_crrf_jax_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_entry_points_import_inference():
    """CloudRemover sits on top of sampling, tiling and the bundle; only the CLIs and the demo use it."""
    importers = {name for name, targets in import_graph().items() if "crrf_jax.inference" in targets}
    assert importers <= {"crrf_jax.predict", "crrf_jax.demo"}, importers


def config_files() -> list[str]:
    return [p.name for p in sorted((ROOT / "configs").glob("*.py"))]


@pytest.mark.parametrize("filename", config_files())
def test_configs_import_only_configs_and_the_standard_library(filename):
    allowed = {"ml_collections", "__future__", "configs", *sys.stdlib_module_names}
    config_module = f"{PACKAGE}.config"

    def fine(module, names):
        if module.partition(".")[0] in allowed:
            return True
        if module == PACKAGE:
            return set(names) == {"config"}
        return module == config_module or module.startswith(config_module + ".")

    unexpected = sorted({module for module, names in imports(ROOT / "configs" / filename)
                         if not fine(module, names)})
    assert not unexpected, f"configs/{filename} imports {unexpected}"
