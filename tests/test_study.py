"""`memstudy study` end to end: the smoke plan completes, a rerun executes nothing, a changed parameter
reruns only what depends on it, a failing run leaves the others complete, an interrupted training resumes,
and comparison.csv holds the contract's columns with the runs' values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from memstudy.analysis import COMPARISON_COLUMNS
from memstudy.workflow.plan import load_plan

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def study(plan: Path, runs: Path, *extra: str, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "memstudy.cli", "study", "--plan", str(plan), "--runs-dir", str(runs)]
    return subprocess.run([*command, "--cores", "2", *extra], capture_output=True, text=True, env=env)


def notebook_mtimes(plan_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(plan_dir)): p.stat().st_mtime_ns for p in plan_dir.rglob("*.ipynb")}


def test_the_smoke_plan_runs_every_notebook_and_fills_the_comparison(smoke_study):
    plan_dir, result = smoke_study["plan_dir"], smoke_study["result"]
    jobs = load_plan(ROOT / "plans" / "smoke.yaml").jobs()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(jobs)} done, 0 up to date, 0 failed, 0 not run" in result.stdout
    for job in jobs:
        assert (plan_dir / job.notebook).is_file(), job.notebook
    table = pd.read_csv(plan_dir / "comparison.csv")
    assert tuple(table.columns[: len(COMPARISON_COLUMNS)]) == COMPARISON_COLUMNS
    runs = [job.run for job in jobs if job.step == "train"]
    models = load_plan(ROOT / "plans" / "smoke.yaml").models
    checkpoints = {run: models[run.model]["checkpoints"] for run in runs}
    assert len(table) == sum(len(c) for c in checkpoints.values())
    for run in runs:
        rows = json.loads((plan_dir / run.folder / "summary.json").read_text())["rows"]
        for row in rows:
            (line,) = table[
                (table["dataset"] == run.dataset)
                & (table["model"] == run.model)
                & (table["n_train_subjects"] == run.n_subjects)
                & (table["step"] == row["step"])
            ].to_dict("records")
            for column in ("n_samples", "median_max_r", "frac_likely_copies", "holdout_p99", "sampler"):
                assert (
                    line[column] == pytest.approx(row[column], nan_ok=True)
                    if isinstance(row[column], float)
                    else line[column] == row[column]
                )


def test_a_rerun_executes_nothing_and_a_changed_parameter_reruns_only_its_dependents(smoke_study, tmp_path):
    plan_dir, env = smoke_study["plan_dir"], smoke_study["env"]
    before = notebook_mtimes(plan_dir)
    again = study(ROOT / "plans" / "smoke.yaml", plan_dir.parent, env=env)
    assert again.returncode == 0, again.stdout[-3000:]
    assert " 0 done, " in again.stdout and "0 failed" in again.stdout
    assert notebook_mtimes(plan_dir) == before

    plan = yaml.safe_load((ROOT / "plans" / "smoke.yaml").read_text())
    plan["models"]["stylegan"]["sampling"]["n_samples"] += 2
    changed = tmp_path / "smoke.yaml"
    changed.write_text(yaml.safe_dump(plan))
    dry = study(changed, plan_dir.parent, "--dry-run", env=env)
    assert dry.returncode == 0 and "Params have changed" in dry.stdout + dry.stderr
    rerun = study(changed, plan_dir.parent, env=env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    after = notebook_mtimes(plan_dir)
    reexecuted = {name for name in after if after[name] != before.get(name)}
    expected = {
        name
        for name in before
        if "/stylegan/" in name and name.rsplit("/", 1)[-1].startswith(("03_sample", "04_memorization"))
    }
    assert reexecuted == expected | {"05_compare.ipynb"}
    table = pd.read_csv(plan_dir / "comparison.csv")
    n_samples = table.set_index("model")["n_samples"]
    assert (n_samples["stylegan"] == plan["models"]["stylegan"]["sampling"]["n_samples"]).all()
    assert (n_samples["ddpm"] == plan["models"]["ddpm"]["sampling"]["n_samples"]).all()


def one_model_plan(folder: Path, name: str, train_subjects: list[int], steps: int, **overrides) -> Path:
    plan = {
        "name": name,
        "datasets": {
            "cxr-phantom": {
                # The smoke plan's small phantom, already in the shared cache.
                "options": load_plan(ROOT / "plans" / "smoke.yaml").datasets["cxr-phantom"]["options"],
                "holdout_split": "test",
                "train_subjects": train_subjects,
            }
        },
        "models": {
            "stylegan": {
                "config": "tiny",
                "overrides": {"batch_size": 4, **overrides},
                "steps": steps,
                "checkpoints": [steps],
                "sampling": {"n_samples": 4},
            }
        },
        "memorization": {"k": 2, "max_browser_images": 4},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_a_failing_run_leaves_the_others_complete_and_names_its_partial_notebook(smoke_study, tmp_path):
    env = smoke_study["env"]
    plan = one_model_plan(tmp_path, "failing", [6, 100000], steps=4)
    result = study(plan, tmp_path / "runs", env=env)
    assert result.returncode == 1
    plan_dir = tmp_path / "runs" / "failing"
    partial = plan_dir / "cxr-phantom/stylegan/n100000-s0/02_train.failed.ipynb"
    assert partial.is_file() and not partial.with_name("02_train.ipynb").exists()
    failure = "failed: cxr-phantom/stylegan/n100000-s0/02_train.ipynb: ValueError: n_subjects=100000"
    assert failure in result.stdout
    assert str(partial) in result.stdout
    # Each job's stderr is kept where `memstudy study` looks for it (the Snakefile's log: entries).
    from memstudy.workflow.execute import log_path

    assert (
        "n_subjects=100000"
        in log_path(plan_dir, "cxr-phantom/stylegan/n100000-s0/02_train.ipynb").read_text()
    )
    assert (plan_dir / "cxr-phantom/stylegan/n6-s0/summary.json").is_file()
    assert "not run (an input failed or is missing): " in result.stdout
    assert not (plan_dir / "comparison.csv").exists()


def test_an_interrupted_training_resumes_from_its_last_checkpoint(smoke_study, tmp_path):
    env = smoke_study["env"]
    plan = one_model_plan(tmp_path, "interrupted", [6], steps=400, checkpoint_every=5)
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "memstudy.cli", "study", "--plan", str(plan), "--runs-dir", str(runs)]
    process = subprocess.Popen(
        [*command, "--cores", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoints = runs / "interrupted/cxr-phantom/stylegan/n6-s0/checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step_*.pt")) and time.monotonic() < deadline:
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches every process of the study
    process.wait(timeout=60)
    first = sorted(checkpoints.glob("step_*.pt"))
    assert first, "training wrote no checkpoint before the interruption"
    assert not (runs / "interrupted/cxr-phantom/stylegan/n6-s0/train.json").exists()
    result = study(plan, runs, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    notebook = nbformat.read(runs / "interrupted/cxr-phantom/stylegan/n6-s0/02_train.ipynb", as_version=4)
    text = json.dumps([cell.get("outputs", []) for cell in notebook.cells])
    assert "resumed" in text
    assert (checkpoints / "step_00000400.pt").is_file()


def test_memstudy_run_executes_one_notebook_with_new_parameters_into_its_own_folder(smoke_study, tmp_path):
    env = smoke_study["env"]
    command = [sys.executable, "-m", "memstudy.cli", "run", "01_data", "-p", "dataset", "cxr-phantom"]
    options = load_plan(ROOT / "plans" / "smoke.yaml").datasets["cxr-phantom"][
        "options"
    ]  # its cached phantom
    command += ["-p", "data_options", json.dumps(options), "-p", "n_subjects", "6"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (executed,) = (tmp_path / "runs" / "adhoc").glob("01_data-*/01_data.ipynb")
    notebook = nbformat.read(executed, as_version=4)
    injected = next(c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "n_subjects = 6" in injected.source and f"data_options = {json.dumps(options)}" in injected.source
    bad = subprocess.run(
        [*command[:5], "-p", "sise", "32"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert bad.returncode == 2
    assert "01_data.ipynb has no parameters ['sise']" in bad.stderr
