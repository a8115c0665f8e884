"""The engine's shape, read from its source with ``ast`` (nothing is imported): no import cycles,
no function over 80 lines and no file over 500 (rooms small enough to find one's way in)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

ENGINE = REPO / "MedTLTraining" / "medtl"


def module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ENGINE.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` blocks run under a type checker only, never at import."""
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, *, module_level_only: bool = False):
    """Every import statement, at module level or (unless ``module_level_only``) inside a
    function, except type-only ones. Class bodies run at import, so they count as module level."""
    for node in ast.iter_child_nodes(tree):
        if _type_checking_only(node):
            continue
        if module_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _imports(node, module_level_only=module_level_only)


def imported_modules(path: Path, modules: dict[str, Path], *, module_level_only: bool = False) -> set[str]:
    """The engine modules that ``path`` imports: ``from medtl.a import b`` is ``medtl.a.b`` when
    that is a module, else ``medtl.a``."""
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in _imports(tree, module_level_only=module_level_only):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph(*, module_level_only: bool = False) -> dict[str, set[str]]:
    modules = engine_modules()
    return {
        name: imported_modules(path, modules, module_level_only=module_level_only) - {name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as the modules along it (first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_reports_the_modules_along_it():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_among_engine_modules():
    """Module-level and function-level imports alike, without exceptions: a function-level import
    only hides a cycle until that function runs."""
    graph = import_graph()
    assert "medtl.cli" in graph and graph["medtl.cli"], "the import graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycles_at_module_level():
    """Without exceptions: a cycle among module-level imports breaks depending on which module is
    imported first."""
    graph = import_graph(module_level_only=True)
    assert graph["medtl.cli"], "the import graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500


def long_functions(path: Path, *, root: Path = ENGINE.parent, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``module.function (N lines)`` for every function or method of ``path`` longer than ``limit``."""
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{module}.{node.name} ({lines} lines)")
    return found


def test_long_functions_are_found(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    (tmp_path / "medtl").mkdir()
    source = tmp_path / "medtl" / "sample.py"
    source.write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert [entry.split(" ")[0] for entry in long_functions(source, root=tmp_path)] == ["medtl.sample.long"]


def test_no_engine_function_over_80_lines_and_no_file_over_500():
    modules = engine_modules()
    assert len(modules) > 50, "the engine's modules were not found"
    too_long = [entry for path in modules.values() for entry in long_functions(path)]
    assert not too_long, "split these into named steps: " + ", ".join(too_long)
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules.items()}
    too_big = [f"{name} ({n} lines)" for name, n in sizes.items() if n > MAX_FILE_LINES]
    assert not too_big, "split these by responsibility: " + ", ".join(too_big)
