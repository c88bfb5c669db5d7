"""The package stays easy to find one's way in: imports never form a cycle, every module says its
one job in a docstring, and no function grows past what one screen shows."""

from __future__ import annotations

import ast
from functools import cache

from helpers import ROOT

PACKAGE = ROOT / "anemia_dist"
MAX_FUNCTION_LINES = 80


@cache
def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob("*.py"))}


def imported_modules(tree: ast.Module, names: set[str]) -> set[str]:
    """The package's modules this one imports, wherever the import statement is (lazy ones too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import a, b
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("anemia_dist."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("anemia_dist."))
    return found & names


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with a path stack)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = "done", path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_the_package_modules():
    trees = modules()
    graph = {name: imported_modules(tree, set(trees)) - {name} for name, tree in trees.items()}
    assert graph["trainer"] >= {"checkpointing", "validation", "splits"}, "the graph sees the package's imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_validation_and_inference_do_not_pull_in_the_trainer():
    trees = modules()
    graph = {name: imported_modules(tree, set(trees)) for name, tree in trees.items()}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in graph[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        return seen

    assert "trainer" not in reachable("validation") | reachable("inference")


def test_every_module_has_a_docstring_saying_its_job():
    missing = [name for name, tree in modules().items() if len((ast.get_docstring(tree) or "").split()) < 5]
    assert not missing, f"give these modules a docstring saying what they hold: {missing}"


def test_no_function_is_longer_than_a_screen():
    lengths = [
        (node.end_lineno - node.lineno + 1, f"{name}.py:{node.name}")
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    assert max(lengths)[0] > 40, "the measure sees the functions"
    too_long = sorted(entry for entry in lengths if entry[0] > MAX_FUNCTION_LINES)
    assert not too_long, f"split these functions (lines, where): {too_long}"


def test_no_run_directory_file_name_is_spelt_outside_run_dir():
    """Every file a run holds is named once, in run_dir.py (folder names such as ``best`` are
    ordinary words elsewhere, so the files with an extension are checked)."""
    import anemia_dist.run_dir as run_dir

    names = {value for key, value in vars(run_dir).items() if key.isupper() and "." in str(value)}
    assert {"summary.json", "metrics.jsonl", "meta.json"} <= names
    spelt = [
        f"{path.name}: {node.value!r}"
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name != "run_dir.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in names
    ]
    assert not spelt, f"use the run_dir constants: {spelt}"
