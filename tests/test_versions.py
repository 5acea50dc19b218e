"""The oldest environment CI builds (constraints-oldest.txt) is exactly the lower bounds the
project declares, so the range the README states is the range the tests ran."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _requirements(lines):
    return [Requirement(line) for line in (raw.split("#")[0].strip() for raw in lines) if line]


def declared():
    reqs = _requirements((ROOT / "requirements.txt").read_text().splitlines())
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # [browser] (JupyterLab + Playwright for the browser test) is installed in the newest environment
    # only: the oldest one holds Kaggle's ipywidgets/ipykernel pins, which today's JupyterLab does not fit.
    reqs += _requirements(line for name, group in extras.items() if name != "browser" for line in group)
    return reqs


def pins():
    out = {}
    for req in _requirements((ROOT / "constraints-oldest.txt").read_text().splitlines()):
        (spec,) = req.specifier
        assert spec.operator == "==", f"constraints-oldest.txt: {req} is not an exact pin"
        out[canonicalize_name(req.name)] = spec.version
    return out


def test_oldest_constraints_pin_every_declared_lower_bound():
    pinned = pins()
    for req in declared():
        name = canonicalize_name(req.name)
        floors = [s.version for s in req.specifier if s.operator == ">="]
        assert len(floors) == 1, f"{req}: declare one lower bound (>=), so CI can test it"
        assert pinned.get(name) == floors[0], (
            f"{req.name}: requirements declare >={floors[0]} but constraints-oldest.txt pins "
            f"{pinned.get(name)}; keep the two equal")


def test_constraints_pin_nothing_undeclared():
    # torchvision is the one exception: not declared, but pip must pick the build of the pinned torch.
    names = {canonicalize_name(r.name) for r in declared()} | {"torchvision"}
    assert set(pins()) <= names, f"pinned but not declared: {sorted(set(pins()) - names)}"


def test_ci_runs_the_readme_command_in_both_environments():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = 'pip install -e ".[test]" && python -m pytest -q'
    assert command in readme and ci.count(command) == 1
    assert "for env in newest oldest" in ci and "constraints-oldest.txt" in ci
