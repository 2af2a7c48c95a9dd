"""``memstudy study`` (the packaged Snakefile over a plan) and ``memstudy run`` (one notebook by hand)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from memstudy.workflow.execute import (
    NotebookFailed,
    failed_path,
    last_error,
    last_log_error,
    log_path,
    run_notebook,
    template_path,
)
from memstudy.workflow.plan import Job, load_plan, parse_only

WORKFLOW_DIR = Path(__file__).resolve().parent
SNAKEFILE = WORKFLOW_DIR / "Snakefile"
PROFILES_DIR = WORKFLOW_DIR / "profiles"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What became of one job in one ``memstudy study`` call."""

    job: Job
    state: str  # "done", "up to date", "failed", "not run"
    error: str | None = None
    partial: Path | None = None
    log: Path | None = None


def snakemake_command(
    plan_path: Path,
    plan_dir: Path,
    *,
    cores: int,
    only: str = "",
    dry_run: bool = False,
    forcerun: list[str] | None = None,
    profile: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The snakemake command line ``memstudy study`` runs."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(plan_dir)]
    command += ["--config", f"plan={plan_path.resolve()}", f"only={only}"]
    command += ["--cores", str(cores), "--keep-going", "--rerun-incomplete"]
    if dry_run:
        command.append("--dry-run")
    if forcerun:
        command += ["--forcerun", *forcerun]
    if profile:
        packaged = PROFILES_DIR / profile
        command += ["--profile", str(packaged if packaged.is_dir() else Path(profile))]
    return command + list(extra or [])


def outcomes(jobs: list[Job], plan_dir: Path, since: float) -> list[Outcome]:
    """Classify each job by its executed notebook (and partial one) relative to the start time."""
    result = []
    for job in jobs:
        output, partial = plan_dir / job.notebook, failed_path(plan_dir / job.notebook)
        log = log_path(plan_dir, job.notebook)
        if partial.is_file() and partial.stat().st_mtime >= since:
            result.append(Outcome(job, "failed", last_error(partial) or "see the partial notebook", partial))
        elif output.is_file():
            result.append(Outcome(job, "done" if output.stat().st_mtime >= since else "up to date"))
        elif log.is_file() and log.stat().st_mtime >= since:  # it ran, but stopped before its notebook did
            result.append(Outcome(job, "failed", last_log_error(log) or "see its log", log=log))
        else:
            result.append(Outcome(job, "not run"))
    return result


def summary_lines(results: list[Outcome]) -> list[str]:
    counts = {
        state: sum(r.state == state for r in results) for state in ("done", "up to date", "failed", "not run")
    }
    lines = [", ".join(f"{n} {state}" for state, n in counts.items())]
    for r in results:
        if r.state == "failed":
            where = f"partial notebook: {r.partial}" if r.partial else f"log: {r.log}"
            lines.append(f"  failed: {r.job.notebook}: {r.error}\n          {where}")
    not_run = [r.job.notebook for r in results if r.state == "not run"]
    if not_run:
        lines.append(f"  not run (an input failed or is missing): {', '.join(not_run)}")
    return lines


def run_study(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    only = parse_only(args.only)
    plan_dir = Path(args.runs_dir) / plan.name
    plan_dir.mkdir(parents=True, exist_ok=True)
    extra = args.snakemake_args[1:] if args.snakemake_args[:1] == ["--"] else args.snakemake_args
    command = snakemake_command(
        args.plan,
        plan_dir,
        cores=args.cores,
        only=args.only or "",
        dry_run=args.dry_run,
        forcerun=args.forcerun,
        profile=args.profile,
        extra=extra,
    )
    if args.unlock:
        status = subprocess.run([*command, "--unlock"]).returncode
        print(f"study {plan.name}: {'unlocked' if status == 0 else 'could not unlock'} {plan_dir}")
        return status
    locks = plan_dir / ".snakemake" / "locks"
    if locks.is_dir() and any(locks.iterdir()):
        log.warning(
            "%s is locked: by a study running now, or by one that was killed; if none is running, "
            "run the same command with --unlock once",
            plan_dir,
        )
    jobs = plan.jobs(only)
    print(
        f"study {plan.name}: {len(jobs)} notebooks in {plan_dir} "
        f"({'dry run' if args.dry_run else f'{args.cores} cores'})"
    )
    since = time.time()
    process = subprocess.Popen(command)
    try:
        status = process.wait()
    except KeyboardInterrupt:
        # Snakemake got the Ctrl-C too: let it stop its jobs and release its lock before we exit.
        process.wait()
        raise
    if args.dry_run:
        return status
    results = outcomes(jobs, plan_dir, since)
    print(f"study {plan.name}: " + "\n".join(summary_lines(results)))
    if status or any(r.state != "done" and r.state != "up to date" for r in results):
        return 1
    return 0


def add_study_command(commands: argparse._SubParsersAction) -> None:
    """Add ``memstudy study`` and ``memstudy run``."""
    parser = commands.add_parser(
        "study",
        help="run a study plan with Snakemake: train, sample, memorization and comparison notebooks",
        description="Expand a plan (plans/*.yaml) into notebook jobs and run them with the packaged "
        "Snakefile. "
        "Only what changed reruns (parameters, notebooks, the package code a step uses, inputs); independent "
        "jobs run in parallel; a failing job keeps its partial notebook (*.failed.ipynb) and the others "
        "go on. "
        "Options after -- go to snakemake.",
    )
    parser.add_argument(
        "--plan", type=Path, default=Path("plans/default.yaml"), help="plan file (default: %(default)s)"
    )
    parser.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="where plan folders go (default: %(default)s)"
    )
    parser.add_argument(
        "--dry-run", "-n", action="store_true", help="say what would run and why, run nothing"
    )
    parser.add_argument(
        "--cores", type=int, default=os.cpu_count() or 1, help="cores to use (default: all, %(default)s here)"
    )
    parser.add_argument(
        "--only",
        help="only these runs, e.g. dataset=cxr-phantom,model=ddpm (keys: dataset, "
        "model, n_subjects, seed); the comparison is not rebuilt",
    )
    parser.add_argument(
        "--forcerun",
        nargs="+",
        metavar="STEP",
        help="rerun these steps (data, train, sample, memorization, compare)",
    )
    parser.add_argument("--profile", help="a Snakemake profile: a packaged one by name (slurm) or a folder")
    parser.add_argument(
        "--unlock",
        action="store_true",
        help="remove the lock a killed study left on the plan's folder (run nothing)",
    )
    parser.add_argument("snakemake_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=run_study)

    run = commands.add_parser(
        "run",
        help="execute one step notebook with new parameters into its own folder",
        description="Execute a step notebook (01_data, 02_train, 03_sample, 04_memorization, 05_compare, or "
        "a notebook path) with papermill. Values are read as YAML (3, 0.5, null, [100, 200], {size: 32}). "
        "The notebook runs in its output folder, so relative paths in its parameters land there.",
    )
    run.add_argument("notebook", help="step notebook name or path")
    run.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a parameter",
    )
    run.add_argument(
        "--output-dir",
        type=Path,
        help="folder for the executed notebook and what it writes "
        "(default: runs/adhoc/<notebook>-<hash of the "
        "parameters>)",
    )
    run.set_defaults(func=run_one)


def run_one(args: argparse.Namespace) -> int:
    template = template_path(args.notebook)
    parameters = {}
    for name, value in args.parameter:
        try:
            parameters[name] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"-p {name} {value!r}: not a YAML value ({error})") from None
    known = notebook_parameters(template)
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise ValueError(f"{template.name} has no parameters {unknown}; its parameters are {sorted(known)}")
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:8]
    folder = args.output_dir or Path("runs", "adhoc", f"{template.stem}-{digest}")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        output = run_notebook(template, folder / template.name, parameters, cwd=folder)
    except NotebookFailed as error:
        print(f"memstudy run: failed: {error}", file=sys.stderr)
        return 1
    print(f"executed {template.name} with {parameters or 'its defaults'} → {output}")
    return 0


def notebook_parameters(template: Path) -> list[str]:
    """Names assigned in a notebook's ``parameters`` cell."""
    import ast

    import nbformat

    for cell in nbformat.read(template, as_version=4).cells:
        if "parameters" in cell.metadata.get("tags", []):
            tree = ast.parse(cell.source)
            return [
                t.id
                for node in tree.body
                if isinstance(node, ast.Assign)
                for t in node.targets
                if isinstance(t, ast.Name)
            ]
    raise ValueError(f"{template}: no cell tagged 'parameters'")
