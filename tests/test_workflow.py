"""The workflow's parts: plans expand to the expected jobs, code stamps follow the code each step runs,
the kernel follows the interpreter, the package ships its workflow, and the paper plan resolves on Slurm."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nbformat
import pytest
import yaml

from memstudy.workflow import execute, stamps
from memstudy.workflow.plan import load_plan, parse_only

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "plans"


def write_plan(folder: Path, plan: dict, name: str = "plan.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(plan))
    return path


def expected_job_counts(plan_file: Path) -> dict[str, int]:
    """Jobs per step, counted from the YAML itself."""
    raw = yaml.safe_load(plan_file.read_text())
    n_runs_by_model = {
        model: sum(len(d["train_subjects"]) for d in raw["datasets"].values()) * len(raw.get("seeds", [0]))
        for model in raw["models"]
    }
    per_checkpoint = sum(n * len(set(raw["models"][m]["checkpoints"])) for m, n in n_runs_by_model.items())
    return {
        "data": len(raw["datasets"]),
        "train": sum(n_runs_by_model.values()),
        "sample": per_checkpoint,
        "memorization": per_checkpoint,
        "compare": 1,
    }


@pytest.mark.parametrize("name", ["smoke", "default", "paper"])
def test_each_plan_expands_to_one_job_per_dataset_run_and_checkpoint(name):
    plan_file = PLANS / f"{name}.yaml"
    jobs = load_plan(plan_file).jobs()
    counts = {
        step: sum(job.step == step for job in jobs)
        for step in ("data", "train", "sample", "memorization", "compare")
    }
    assert counts == expected_job_counts(plan_file)
    notebooks = [job.notebook for job in jobs]
    assert len(set(notebooks)) == len(notebooks)
    titles = [job.title for job in jobs]
    assert len(set(titles)) == len(titles), "every page needs its own title"


def test_the_default_plan_answers_whether_small_sets_are_memorized_more():
    plan = load_plan(PLANS / "default.yaml")
    assert set(plan.datasets) == {"brain-phantom", "cxr-phantom"}
    assert set(plan.models) == {"ddpm", "stylegan"}
    for d in plan.datasets.values():
        assert len(d["train_subjects"]) >= 2
    for m in plan.models.values():
        assert len(m["checkpoints"]) >= 2
        assert m["sampling"]["sampler"] in (None, "ancestral") and m["sampling"]["sample_steps"] is None


def test_only_selects_runs_and_leaves_the_comparison_out():
    plan = load_plan(PLANS / "smoke.yaml")
    jobs = plan.jobs(parse_only("dataset=cxr-phantom,model=ddpm"))
    runs = {job.run for job in jobs if job.run}
    assert {(r.dataset, r.model) for r in runs} == {("cxr-phantom", "ddpm")}
    assert [job.notebook for job in jobs if job.step == "data"] == ["cxr-phantom/01_data.ipynb"]
    assert not [job for job in jobs if job.step == "compare"]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_only("dataset")
    with pytest.raises(ValueError, match="keys dataset, model"):
        parse_only("colour=red")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda p: p["models"]["ddpm"].update(checkpoints=[0, 30]),
            r"models\.ddpm\.checkpoints must be .* 1\.\.30",
        ),
        (lambda p: p["models"]["ddpm"].update(stepz=3), r"models\.ddpm: unknown settings \['stepz'\]"),
        (lambda p: p["datasets"]["cxr-phantom"].update(train_subjects=[8, 8]), "distinct positive integers"),
        (lambda p: p.update(datasets={"mnist": {"train_subjects": [1]}}), "unknown dataset 'mnist'"),
        (lambda p: p["models"].update(vae=p["models"]["ddpm"]), "unknown model 'vae'"),
        (
            lambda p: p.update(resources={"train": {"gpus": 1}}),
            r"resources\.train: unknown settings \['gpus'\]",
        ),
        (lambda p: p.update(seeds=[-1]), "seeds must be"),
    ],
)
def test_a_bad_plan_names_the_file_and_the_setting(tmp_path, edit, message):
    plan = yaml.safe_load((PLANS / "smoke.yaml").read_text())
    edit(plan)
    path = write_plan(tmp_path, plan)
    with pytest.raises(ValueError, match=message) as error:
        load_plan(path)
    assert str(path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="no such plan file"):
        load_plan(tmp_path / "missing.yaml")


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of the package that the stamps read, so tests can edit its code."""
    copy = tmp_path / "src" / "memstudy"
    shutil.copytree(stamps.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(stamps, "PACKAGE_DIR", copy)
    monkeypatch.setattr(stamps, "NOTEBOOKS_DIR", copy / "notebooks")
    return copy


def changed_stamps(package: Path, relative: str, edit) -> set[str]:
    before = stamps.compute_stamps(["ddpm", "stylegan"])
    path = package / relative
    path.write_text(edit(path.read_text()))
    after = stamps.compute_stamps(["ddpm", "stylegan"])
    return {name for name in before if before[name] != after[name]}


def test_stamps_cover_the_steps_notebooks_and_nothing_else():
    names = set(stamps.compute_stamps(["ddpm", "stylegan"]))
    per_model = {
        f"notebook-{stem}-{model}" for stem in ("02_train", "03_sample") for model in ("ddpm", "stylegan")
    }
    others = {"notebook-01_data", "notebook-04_memorization", "notebook-05_compare"}
    assert names == {"data", "models-ddpm", "models-stylegan"} | per_model | others


def test_a_stylegan_fix_changes_only_stylegan_stamps(package_copy):
    changed = changed_stamps(package_copy, "models/stylegan.py", lambda s: s + "\n# a fix\n")
    assert changed == {"models-stylegan", "notebook-02_train-stylegan", "notebook-03_sample-stylegan"}


def test_a_figure_edit_changes_only_the_report_stamps(package_copy):
    changed = changed_stamps(package_copy, "figures/memorization.py", lambda s: s + "\n# a new colour\n")
    assert changed == {"notebook-04_memorization", "notebook-05_compare"}


def test_a_loader_refactor_keeps_the_models_and_a_new_pipeline_version_changes_them(package_copy):
    refactor = changed_stamps(package_copy, "data/brats.py", lambda s: s + "\n# refactored\n")
    assert not any(name.startswith("models-") for name in refactor)
    assert "notebook-01_data" in refactor
    bump = changed_stamps(
        package_copy,
        "data/brats.py",
        lambda s: re.sub(r"^PIPELINE_VERSION = (\d+)", "PIPELINE_VERSION = 99", s, flags=re.M),
    )
    assert "data" in bump
    assert not any(name.startswith("models-") for name in bump)  # the data stamp is a job input of its own


def test_write_stamps_touches_only_changed_files(tmp_path):
    first = stamps.write_stamps(tmp_path, {"a": "1", "b": "2"})
    mtimes = {name: path.stat().st_mtime_ns for name, path in first.items()}
    stamps.write_stamps(tmp_path, {"a": "1", "b": "3"})
    assert first["a"].stat().st_mtime_ns == mtimes["a"]
    assert first["b"].read_text() == "3"


NOTEBOOK_IMPORTS = """
import json, sys
import nbformat
loaded_before = set(sys.modules)
nb = nbformat.read(sys.argv[1], as_version=4)
for cell in nb.cells:
    if cell.cell_type == "code" and "import" in cell.source:
        code = "\\n".join(l for l in cell.source.splitlines() if l.startswith(("import ", "from ")))
        exec(code, {})
print(json.dumps(sorted(m.__file__ for name, m in sys.modules.items()
                        if name.startswith("memstudy") and getattr(m, "__file__", None))))
"""


@pytest.mark.parametrize("notebook", sorted(stamps.NOTEBOOKS_DIR.glob("*.ipynb")), ids=lambda p: p.stem)
def test_a_notebook_stamp_covers_every_module_the_notebook_loads(notebook):
    """The static closure must contain what Python really imports (measured in a fresh interpreter)."""
    result = subprocess.run(
        [sys.executable, "-c", NOTEBOOK_IMPORTS, str(notebook)], capture_output=True, text=True, check=True
    )
    loaded = {Path(f).resolve() for f in json.loads(result.stdout.strip().splitlines()[-1])}
    loaded = {f for f in loaded if stamps.PACKAGE_DIR in f.parents}
    model = {"02": "ddpm", "03": "ddpm"}.get(notebook.stem[:2])
    closure = set(
        stamps.module_closure(stamps.notebook_modules(notebook), exclude=stamps.other_models(model))
    )
    excused = {stamps.module_file(m) for m in stamps.other_models(model)}
    assert loaded - excused <= closure


def test_the_kernel_runs_this_interpreter_without_an_install(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", "")
    from jupyter_client.kernelspec import KernelSpecManager

    name = execute.kernel_name()
    spec = KernelSpecManager().get_kernel_spec(name)
    assert spec.argv[0] == sys.executable


def test_a_failing_notebook_keeps_its_partial_output_and_the_target_untouched(tmp_path):
    notebook = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("x = 1\nthreads = None", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("import os; print('threads', os.environ.get('OMP_NUM_THREADS'))"),
            nbformat.v4.new_code_cell("assert x > 1, f'x must exceed 1, got {x}'"),
        ]
    )
    template = tmp_path / "t.ipynb"
    nbformat.write(notebook, template)
    target = tmp_path / "out" / "t.ipynb"
    failed = subprocess.run(
        execute.command_line(str(template), target, {"x": 1}), shell=True, capture_output=True, text=True
    )
    assert failed.returncode == 1
    assert "AssertionError: x must exceed 1, got 1" in failed.stderr
    assert not target.exists()
    partial = execute.failed_path(target)
    assert execute.last_error(partial) == "AssertionError: x must exceed 1, got 1"
    done = subprocess.run(execute.command_line(str(template), target, {"x": 2}, threads=3), shell=True)
    assert done.returncode == 0 and target.is_file() and not partial.exists()
    outputs = json.dumps(nbformat.read(target, as_version=4).cells[-2].outputs)
    assert "threads 3" in outputs, "the job's thread count reaches the kernel"


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_job_exits_at_once_and_leaves_no_partial_notebook(tmp_path, stop):
    started = tmp_path / "started"
    notebook = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("flag = ''", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("import pathlib, time; pathlib.Path(flag).touch(); time.sleep(120)"),
        ]
    )
    template = tmp_path / "t.ipynb"
    nbformat.write(notebook, template)
    out = tmp_path / "out"
    job = subprocess.Popen(
        shlex.split(execute.command_line(str(template), out / "t.ipynb", {"flag": str(started)}))
    )
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert job.poll() is None and time.monotonic() < deadline, "the notebook's cell never ran"
            time.sleep(0.1)
        job.send_signal(stop)
        assert job.wait(timeout=10) == 128 + stop
    finally:
        job.kill()
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.slow
def test_the_wheel_ships_the_snakefile_profiles_and_notebooks(tmp_path):
    source = tmp_path / "source"  # setuptools writes build/ into the tree it builds
    shutil.copytree(ROOT / "memstudy", source / "memstudy", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("memstudy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"memstudy/workflow/Snakefile", "memstudy/workflow/profiles/slurm/config.yaml"}
    expected |= {f"memstudy/notebooks/{p.name}" for p in stamps.NOTEBOOKS_DIR.glob("*.ipynb")}
    assert len(expected) >= 7 and expected <= names


@pytest.mark.slow
def test_the_paper_plan_resolves_every_job_through_the_slurm_profile(tmp_path):
    """Dry run only: no cluster here. Every rule's job count must match the plan."""
    from memstudy.workflow.command import PROFILES_DIR, SNAKEFILE

    plan_file = PLANS / "paper.yaml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(SNAKEFILE),
            "--directory",
            str(tmp_path / "paper"),
            "--config",
            f"plan={plan_file}",
            "only=",
            "--profile",
            str(PROFILES_DIR / "slurm"),
            "--dry-run",
            "--quiet",
            "rules",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", result.stdout + result.stderr, flags=re.M))
    expected = expected_job_counts(plan_file)
    n_runs = expected["train"]
    assert {rule: int(n) for rule, n in table.items() if rule != "total"} == {
        "all": 1,
        **expected,
        "summary": n_runs,
    }


def test_the_summary_tells_each_jobs_outcome_and_where_a_failure_is_described(tmp_path):
    import os
    import time

    from memstudy.workflow.command import outcomes, summary_lines

    jobs = load_plan(ROOT / "plans" / "smoke.yaml").jobs()[:4]
    since = time.time() - 5
    done, old, partial_job = (tmp_path / job.notebook for job in jobs[:3])
    for path in (done, old):
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nbformat.v4.new_notebook(), path)
    os.utime(old, (since - 60, since - 60))  # written by an earlier call
    failed = execute.failed_path(partial_job)
    failed.parent.mkdir(parents=True, exist_ok=True)
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("error", ename="ValueError", evalue="bad size", traceback=[])]
    notebook.cells = [cell]
    nbformat.write(notebook, failed)
    # A job that stopped before its notebook ran (its kernel died): only its log tells why.
    log = execute.log_path(tmp_path, jobs[3].notebook)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: Kernel died before replying\n")
    results = outcomes([*jobs, *load_plan(ROOT / "plans" / "smoke.yaml").jobs()[4:5]], tmp_path, since)
    assert [r.state for r in results] == ["done", "up to date", "failed", "failed", "not run"]
    assert (results[2].error, results[2].partial) == ("ValueError: bad size", failed)
    assert (results[3].error, results[3].log) == ("RuntimeError: Kernel died before replying", log)
    lines = "\n".join(summary_lines(results))
    assert lines.startswith("1 done, 1 up to date, 2 failed, 1 not run")
    assert f"partial notebook: {failed}" in lines and f"log: {log}" in lines


@pytest.mark.parametrize(
    ("failures", "executed_before_dying", "expected_calls", "raises"),
    [
        (1, False, 2, False),  # a kernel that died at start: one more try, which succeeds
        (2, False, 2, True),  # twice: the error propagates
        (1, True, 1, True),  # died after running a cell: no retry (the notebook's own doing)
    ],
)
def test_a_kernel_that_dies_before_any_cell_is_started_once_more(
    tmp_path, monkeypatch, failures, executed_before_dying, expected_calls, raises
):
    import papermill

    calls = []

    def fake_execute(template, output, **kwargs):
        calls.append(output)
        notebook = nbformat.v4.new_notebook()
        notebook.cells = [nbformat.v4.new_code_cell("x = 1")]
        if len(calls) <= failures:
            notebook.cells[0].execution_count = 1 if executed_before_dying else None
            nbformat.write(notebook, output)
            raise RuntimeError("Kernel died before replying to kernel_info")
        nbformat.write(notebook, output)

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    monkeypatch.setattr(execute, "kernel_name", lambda: "python3")
    target = tmp_path / "out.ipynb"
    if raises:
        with pytest.raises(RuntimeError, match="Kernel died"):
            execute.run_notebook("05_compare", target, {})
        assert not target.exists() and not execute.failed_path(target).exists()
    else:
        assert execute.run_notebook("05_compare", target, {}) == target and target.is_file()
    assert len(calls) == expected_calls
