"""The package's shape: dependencies point one way (jobs → cli → job packages → shared modules → errors).

Read with ``ast`` from the source, so these tests import nothing and take milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mnist_ray"
# Modules longer than this say in their docstring why they are one cohesive thing.
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (at any depth of its code, lazily or not)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parents, base]).strip(".")
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # A package above the importing module (mnist_ray itself selects tf-keras) is not a
            # dependency: importing any module of a package runs that package's __init__ first.
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_no_module_of_the_library_imports_the_command_line():
    importers = sorted(name for name, deps in import_graph().items() if "mnist_ray.cli" in deps)
    assert importers == []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_errors_and_config_depend_on_nothing_heavier():
    graph = import_graph()
    assert graph["mnist_ray.errors"] == set()
    assert graph["mnist_ray.config"] <= {"mnist_ray.errors"}


def test_each_job_has_its_package():
    names = modules()
    for job in ("train", "tune", "score"):
        assert f"mnist_ray.{job}.job" in names, job


def test_long_modules_say_why_they_are_one_thing():
    for name, path in modules().items():
        lines = path.read_text().count("\n")
        if lines > MAX_LINES:
            docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "cohesive" in docstring, f"{name} has {lines} lines and its docstring does not say why"
