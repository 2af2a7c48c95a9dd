"""Project hygiene: pinned dependencies agree, notebooks are committed clean, the CLI explains itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def pinned(lines):
    """{normalized name: version} from 'name==version' lines."""
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if "==" in line and not line.startswith("-"):
            requirement = Requirement(line)
            pins[re.sub(r"[-_.]+", "-", requirement.name).lower()] = str(requirement.specifier).removeprefix(
                "=="
            )
    return pins


def project_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["dev"] + extras["gpu"]]


def test_every_dependency_is_locked_and_the_lock_satisfies_pyproject():
    locked = pinned((ROOT / "constraints.txt").read_text().splitlines())
    for requirement in project_requirements():
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in locked, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(locked[name]), f"{name}=={locked[name]} violates {requirement}"


def test_environment_yml_lists_the_same_packages_at_the_locked_versions():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    commented = [
        line.strip().lstrip("#").strip().lstrip("- ")
        for line in (ROOT / "environment.yml").read_text().splitlines()
        if line.strip().startswith("# -")
    ]
    conda = pinned(pip_section + commented)
    locked = pinned((ROOT / "constraints.txt").read_text().splitlines())
    expected = {re.sub(r"[-_.]+", "-", r.name).lower() for r in project_requirements()}
    assert set(conda) == expected
    assert {name: locked[name] for name in expected} == conda


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs_and_with_a_parameters_cell(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), (
        f"{notebook.name} has outputs"
    )
    assert sum("parameters" in c["metadata"].get("tags", []) for c in cells) == 1


def test_help_explains_every_subcommand():
    result = subprocess.run(
        [sys.executable, "-m", "memstudy.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("data", "train", "sample", "correlate", "study", "book", "bench"):
        assert re.search(rf"^\s+{command}\s+\w", result.stdout, re.M), f"'{command}' is not explained"
