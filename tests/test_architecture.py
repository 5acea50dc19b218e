"""The package stays readable: small modules, functions that fit one screen, no test code in the
package, no import circles, and a README whose layout section names the files that exist."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cxr_helpers"
MODULES = sorted(PACKAGE.glob("*.py"))
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_and_its_functions_fit_one_reading(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines (limit {MAX_MODULE_LINES}): split it by concern"
    long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in _functions(ast.parse(path.read_text()))
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_no_test_helpers_ship_in_the_package():
    for path in MODULES:
        text = path.read_text()
        assert "unittest" not in text and "pytest" not in text, f"{path.name} imports test machinery"


def _package_imports(path: Path) -> set[str]:
    """The package modules a module imports (relative imports, at any depth in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found & {p.stem for p in MODULES}


def test_no_import_circles():
    graph = {p.stem: _package_imports(p) for p in MODULES}

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(graph.get(name, ()))
        return seen

    circles = sorted(name for name in graph if name in reach(name) and name != "__main__")
    assert not circles, f"modules that import themselves through others: {', '.join(circles)}"


def _layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Layout", 1)[1].split("```")[1]


@pytest.mark.parametrize("folder", ["cxr_helpers", "benchmarks", "tests"])
def test_readme_layout_names_the_files_that_exist(folder):
    block = _layout_block()
    # The folder's entry: from its name at the start of a line to the next top-level entry.
    entry = re.search(rf"^{folder}/(.*?)(?=^\S)", block, re.S | re.M).group(1)
    named = set(re.findall(r"[\w]+\.(?:py|sh)", entry))
    present = {p.name for p in (ROOT / folder).iterdir() if p.suffix in (".py", ".sh")} - {"__init__.py"}
    if folder == "tests":  # test_*.py are covered by "unit tests per module"; the helpers are named
        present = {name for name in present if not name.startswith("test_")} - {"conftest.py"}
        named = {name for name in named if not name.startswith("test_")}
    assert named <= present, f"README's layout names files {folder}/ lacks: {sorted(named - present)}"
    assert present <= named, f"README's layout omits {folder}/ files: {sorted(present - named)}"
