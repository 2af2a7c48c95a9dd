"""The study runner: a plan (YAML) → executions of the step notebooks with papermill.

A step whose notebook, parameters and package code are unchanged since its last successful execution
is skipped, so rerunning a plan only recomputes what changed. A failing execution is kept beside its
target as ``*.failed.ipynb`` and does not stop the other executions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import yaml

from memstudy.atomic import atomic_path

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
NOTEBOOKS_DIR = PACKAGE_DIR.parent / "notebooks"
KERNEL = "memstudy"  # registered from the venv by `make install`
STEPS = {"data": "01_data.ipynb"}
STEP_PARAMETERS = {"data": {"dataset", "root", "size", "n_subjects", "seed"}}


@dataclass(frozen=True)
class Execution:
    """One notebook execution: which step, with which parameters, written where."""

    step: str
    parameters: dict[str, Any]
    output: Path


class StudyError(RuntimeError):
    """Some executions of a plan failed; the others completed."""


def load_plan(
    path: str | os.PathLike, *, output_dir: str | os.PathLike = "book/notebooks"
) -> list[Execution]:
    """Read a plan file and expand it into executions.

    The plan maps step names (``data``) to lists of parameter dicts. Each execution writes
    ``<output_dir>/<notebook stem>-<dataset>[-<k>].ipynb``.
    """
    path = Path(path)
    try:
        plan = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such plan file") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(plan, dict) or set(plan) - set(STEPS):
        raise ValueError(f"{path}: a plan maps steps ({', '.join(STEPS)}) to lists of parameters")
    executions = []
    for step, entries in plan.items():
        stem = Path(STEPS[step]).stem
        for k, parameters in enumerate(entries or []):
            if not isinstance(parameters, dict) or "dataset" not in parameters:
                raise ValueError(f"{path}: {step} entry {k + 1} must be a mapping with at least 'dataset'")
            unknown = set(parameters) - STEP_PARAMETERS[step]
            if unknown:
                raise ValueError(
                    f"{path}: {step} entry {k + 1} has unknown parameters {sorted(unknown)}; "
                    f"expected some of {sorted(STEP_PARAMETERS[step])}"
                )
            name = f"{stem}-{parameters['dataset']}"
            if any(e.output.stem == name for e in executions):
                name = f"{name}-{k + 1}"
            executions.append(Execution(step, dict(parameters), Path(output_dir) / f"{name}.ipynb"))
    return executions


def code_fingerprint() -> str:
    """Hash of the package's source, so that a code change reruns the steps."""
    digest = hashlib.sha256()
    for source in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(source.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


def execution_key(execution: Execution, template: Path, fingerprint: str) -> str:
    """Hash of what determines an execution's result: notebook, parameters, package code."""
    blob = json.dumps({"parameters": execution.parameters, "code": fingerprint}, sort_keys=True).encode()
    return hashlib.sha256(template.read_bytes() + blob).hexdigest()


def is_current(output: Path, key: str) -> bool:
    """Whether ``output`` is a successful execution with this key."""
    if not output.is_file():
        return False
    try:
        return nbformat.read(output, as_version=4).metadata.get("memstudy", {}).get("key") == key
    except (OSError, ValueError, nbformat.reader.NotJSONError):
        return False


def execute(
    execution: Execution, *, notebooks_dir: Path = NOTEBOOKS_DIR, fingerprint: str | None = None
) -> bool:
    """Execute one step's notebook unless it is current; return True if it ran.

    Raises ``papermill.PapermillExecutionError`` on a failing cell, after saving the partial
    notebook as ``<output>.failed.ipynb``.
    """
    import papermill

    template = notebooks_dir / STEPS[execution.step]
    key = execution_key(execution, template, fingerprint or code_fingerprint())
    if is_current(execution.output, key):
        log.info("%s is up to date", execution.output)
        return False
    failed = execution.output.with_suffix(".failed.ipynb")
    log.info("executing %s → %s with %s", template.name, execution.output, execution.parameters)
    with atomic_path(execution.output) as partial:
        try:
            papermill.execute_notebook(
                template,
                partial,
                parameters=execution.parameters,
                kernel_name=KERNEL,
                progress_bar=False,
                cwd=str(notebooks_dir.parent),
            )
        except Exception:
            os.replace(partial, failed)
            raise
        notebook = nbformat.read(partial, as_version=4)
        notebook.metadata["memstudy"] = {
            "key": key,
            "step": execution.step,
            "parameters": execution.parameters,
        }
        nbformat.write(notebook, partial)
    failed.unlink(missing_ok=True)
    return True


def run_plan(
    path: str | os.PathLike,
    *,
    output_dir: str | os.PathLike = "book/notebooks",
    notebooks_dir: Path = NOTEBOOKS_DIR,
) -> dict[str, list[Path]]:
    """Execute every step of a plan; return the executed, skipped and failed notebooks.

    Raises
    ------
    StudyError
        After all executions were tried, if any failed (each failure's partial notebook is kept).
    """
    from tqdm.auto import tqdm

    outcome: dict[str, list[Path]] = {"executed": [], "skipped": [], "failed": []}
    fingerprint = code_fingerprint()
    for execution in tqdm(load_plan(path, output_dir=output_dir), desc="study", unit="notebook"):
        try:
            ran = execute(execution, notebooks_dir=notebooks_dir, fingerprint=fingerprint)
        except Exception as error:  # one failed execution must not stop the others
            log.error("%s failed: %s", execution.output, str(error).strip().splitlines()[-1:] or error)
            outcome["failed"].append(execution.output)
            continue
        outcome["executed" if ran else "skipped"].append(execution.output)
    if outcome["failed"]:
        listed = ", ".join(str(p.with_suffix(".failed.ipynb")) for p in outcome["failed"])
        raise StudyError(
            f"{len(outcome['failed'])} of {sum(map(len, outcome.values()))} executions failed; "
            f"partial notebooks: {listed}"
        )
    return outcome


def add_study_command(commands: argparse._SubParsersAction) -> None:
    """Add ``memstudy study`` to the command's subparsers."""
    parser = commands.add_parser(
        "study",
        help="run a study plan: execute the step notebooks with papermill",
        description="Expand a plan (YAML: step → list of parameters) into papermill executions of the "
        "step notebooks. Executions whose notebook, parameters and package code are unchanged are skipped; "
        "a failed one is kept as *.failed.ipynb and the others still run.",
    )
    parser.add_argument(
        "--plan", type=Path, default=Path("plans/default.yaml"), help="plan file (default: %(default)s)"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("book/notebooks"),
        help="where executed notebooks go (default: %(default)s)",
    )
    parser.set_defaults(func=_study_command)


def _study_command(args: argparse.Namespace) -> int:
    try:
        outcome = run_plan(args.plan, output_dir=args.output_dir)
    except StudyError as error:
        log.error("%s", error)
        return 1
    print(f"study {args.plan}: {len(outcome['executed'])} executed, {len(outcome['skipped'])} up to date")
    return 0
