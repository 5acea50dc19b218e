"""The package stays readable: folders by concern that import each other only as the table below
allows, small modules, functions that fit one screen, no test code in the package, no import
circles, and a README whose layout section names the files that exist."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cxr_helpers"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60
TOP_LEVEL = {"__init__", "__main__"}  # the only modules outside a concern's folder

# Which concern may import which (besides itself). A stage never reaches into another stage;
# training does not import sampling; the demo is imported only by the CLI and the notebooks'
# workflow (the demo preset's entry points); nothing but the CLI imports workflow/.
MAY_IMPORT = {
    "core": set(),
    "config": {"core"},
    "figures": {"core"},
    "models": {"core", "config"},
    "data": {"core", "config", "models"},
    "training": {"core", "config", "data", "models", "figures"},
    "sampling": {"core", "config", "data", "models", "figures"},
    "evaluation": {"core", "config", "data", "models", "figures"},
    "demo": {"core", "config", "data", "models", "training"},
    "workflow": {"core", "config", "data", "models", "training", "sampling", "evaluation", "demo", "figures"},
}


def _name(path: Path) -> str:
    """cxr_helpers/training/stage.py -> training.stage; cxr_helpers/data/__init__.py -> data."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _concern(name: str) -> str:
    return name.split(".")[0]


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _imports(path: Path, name: str | None = None) -> set[str]:
    """The package modules (dotted, under cxr_helpers) a module imports, at any depth in the file;
    `name` is the module's dotted name when the file is not in the package (the test's probe)."""
    name = name or _name(path)
    here = name.split(".") if path.name != "__init__.py" else [*name.split("."), "__init__"]
    package = here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "cxr_helpers":
                module = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import x` names a module; `from .x import y` names one in x
                candidate = ".".join([*module, alias.name])
                found.add(candidate if _exists(candidate) else ".".join(module))
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("cxr_helpers.")}
    return {name for name in found if name}


def _exists(dotted: str) -> bool:
    path = PACKAGE.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_its_functions_fit_one_reading(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines (limit {MAX_MODULE_LINES}): split it by concern"
    long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in _functions(ast.parse(path.read_text()))
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_every_module_lives_in_a_concern_folder_the_table_declares():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.stem not in TOP_LEVEL)
    assert not loose, f"modules outside a concern's folder: {loose}; move them into one"
    folders = {p.parent.name for p in MODULES if p.parent != PACKAGE}
    assert folders == set(MAY_IMPORT), f"folders {sorted(folders ^ set(MAY_IMPORT))} are not in MAY_IMPORT or gone"


def test_concerns_import_only_what_the_table_allows():
    wrong = []
    for path in MODULES:
        if path.parent == PACKAGE:
            continue  # __init__ and __main__ (the CLI) may import every concern
        mine = _concern(_name(path))
        for target in _imports(path):
            theirs = _concern(target)
            if theirs != mine and theirs not in MAY_IMPORT[mine]:
                wrong.append(f"{_name(path)} -> {target}")
    assert not wrong, "imports against the table in tests/test_architecture.py: " + "; ".join(sorted(wrong))


def test_the_table_catches_a_wrong_way_import(tmp_path):
    """The check above can fail: a training module that imports sampling is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..sampling.stage import sample\nfrom . import stage\n")
    found = _imports(probe, "training.probe")
    assert found == {"sampling.stage", "training.stage"} and "sampling" not in MAY_IMPORT["training"]


def test_package_faces_are_light_and_name_their_surface():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init.relative_to(ROOT)} says nothing of its concern"
        assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}
        assert "__all__" in assigned, f"{init.relative_to(ROOT)} has no __all__"
        submodules = {p.stem for p in init.parent.glob("*.py")} - {"__init__"}
        where = re.findall(r"dict\.fromkeys\((\[.*?\])", init.read_text())
        exported = {name for names in where for name in ast.literal_eval(names)}
        clash = exported & submodules
        assert not clash, f"{init.relative_to(ROOT)} exports {sorted(clash)}, which are also submodules"


def test_no_test_helpers_ship_in_the_package():
    for path in MODULES:
        text = path.read_text()
        assert "unittest" not in text and "pytest" not in text, f"{path.name} imports test machinery"


def test_no_import_circles():
    graph = {_name(p): {t for t in _imports(p) if t != _name(p)} for p in MODULES}

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(graph.get(name, ()))
        return seen

    # A package face (`data`) imports nothing eagerly but core.lazy, so it is no part of a circle.
    circles = sorted(name for name in graph if name in reach(name) and name != "__main__")
    assert not circles, f"modules that import themselves through others: {', '.join(circles)}"


def _layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Layout", 1)[1].split("```")[1]


def test_readme_layout_names_every_package_file():
    block = _layout_block()
    entry = re.search(r"^cxr_helpers/(.*?)(?=^\S)", block, re.S | re.M).group(1)
    named = set()
    for folder, files in re.findall(r"^\s+(\w+)/\s+(.*?)(?=^\s+\w+/|\Z)", entry, re.S | re.M):
        named |= {f"{folder}/{name}" for name in re.findall(r"\w+\.py", files)}
    present = {str(p.relative_to(PACKAGE)) for p in MODULES if p.parent != PACKAGE and p.name != "__init__.py"}
    assert named <= present, f"README's layout names files cxr_helpers/ lacks: {sorted(named - present)}"
    assert present <= named, f"README's layout omits cxr_helpers/ files: {sorted(present - named)}"


@pytest.mark.parametrize("folder", ["benchmarks", "tests"])
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
