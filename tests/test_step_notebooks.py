"""The step notebooks 02–05 as the workflow chains them (train → sample → memorization → compare, in one
plan folder): their outputs are checked against independent references on one run of the smoke study
(the session fixture ``smoke_study``, which executed them through papermill), and a bad parameter of each
stops its notebook with an error cell that says what was wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import papermill
import pytest
from conftest import float64_pearson

import memstudy
from memstudy.workflow.plan import load_plan

NOTEBOOKS = Path(memstudy.__file__).parent / "notebooks"
SMOKE = load_plan(Path(__file__).resolve().parents[1] / "plans" / "smoke.yaml")
RUN = "cxr-phantom/ddpm/n8-s0"  # the smoke plan's smaller chest x-ray DDPM run
STEPS = tuple(SMOKE.models["ddpm"]["checkpoints"])
N_SAMPLES = SMOKE.models["ddpm"]["sampling"]["n_samples"]
#: The columns comparison.csv starts with, as the workflow issue's contract lists them.
CONTRACT_COLUMNS = [
    "dataset",
    "model",
    "n_train_subjects",
    "n_train_images",
    "seed",
    "step",
    "n_samples",
    "sampler",
    "median_max_r",
    "p95_max_r",
    "frac_above_0.95",
    "holdout_p99",
    "frac_above_holdout_p99",
    "frac_likely_copies",
    "train_train_median_max_r",
]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plan(smoke_study) -> Path:
    """The smoke study's plan folder (read only: tests that execute a notebook work on copies)."""
    assert smoke_study["result"].returncode == 0, smoke_study["result"].stdout[-3000:]
    return smoke_study["plan_dir"]


@pytest.fixture(scope="module")
def cxr_sets(smoke_study) -> dict:
    """The run's training set and held-out set, loaded here from the plan's data options."""
    from memstudy.data import load_dataset

    dataset = SMOKE.datasets["cxr-phantom"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMSTUDY_CACHE", smoke_study["env"]["MEMSTUDY_CACHE"])
        training = load_dataset(
            "cxr-phantom", split="train", n_subjects=8, progress=False, **dataset["options"]
        )
        holdout = load_dataset(
            "cxr-phantom", split=dataset["holdout_split"], progress=False, **dataset["options"]
        )
    return {"training": training, "holdout": holdout}


def copy_run(plan: Path, folder: Path) -> Path:
    """A copy of the run in a plan folder of its own, for tests that execute a notebook on it."""
    shutil.copytree(plan / RUN, folder / RUN, ignore=shutil.ignore_patterns("*.ipynb"))
    return folder


def execute(notebook: str, output: Path, cwd: Path, kernel: str, **parameters) -> nbformat.NotebookNode:
    """Run a step notebook with papermill in ``cwd``; return the executed notebook."""
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(NOTEBOOKS / notebook),
        str(output),
        parameters=parameters,
        kernel_name=kernel,
        cwd=str(cwd),
        progress_bar=False,
    )
    return nbformat.read(output, as_version=4)


def outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]


def glued(notebook: nbformat.NotebookNode) -> dict[str, str]:
    """The plain text of every value the notebook glued, by name."""
    return {
        o["metadata"]["scrapbook"]["name"]: o["data"]["application/papermill.record/text/plain"]
        for o in outputs(notebook)
        if "scrapbook" in o.get("metadata", {})
    }


def plotly_figures(notebook: nbformat.NotebookNode) -> int:
    return sum("plotly-graph-div" in o.get("data", {}).get("text/html", "") for o in outputs(notebook))


def error_of(output: Path, kernel: str, notebook: str, cwd: Path, **parameters) -> dict:
    """Run a notebook that must fail; return its error output (ename, evalue)."""
    with pytest.raises(papermill.PapermillExecutionError):
        execute(notebook, output, cwd, kernel, **parameters)
    errors = [o for o in outputs(nbformat.read(output, as_version=4)) if o["output_type"] == "error"]
    assert len(errors) == 1
    return errors[0]


def test_training_keeps_the_checkpoints_and_records_the_run(plan):
    run = plan / RUN
    record = json.loads((run / "train.json").read_text())
    steps = SMOKE.models["ddpm"]["steps"]
    assert {k: record[k] for k in ("steps", "checkpoints", "model", "n_subjects")} == {
        "steps": steps,
        "checkpoints": list(STEPS),
        "model": "ddpm",
        "n_subjects": 8,
    }
    assert record["n_train_images"] == 8  # one radiograph per patient
    assert (run / "run_key.txt").read_text().strip() == record["run_key"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{s:08d}.pt" for s in STEPS]
    notebook = nbformat.read(run / "02_train.ipynb", as_version=4)
    values = glued(notebook)
    assert values["n_train_images"] == "8" and values["outcome"] == "'new'"
    assert values["kept"] == repr(", ".join(map(str, STEPS)))
    assert plotly_figures(notebook) == 1  # the loss curve


def test_sampling_writes_an_image_set_per_checkpoint_with_its_provenance(plan):
    sampler = f"ancestral-{SMOKE.models['ddpm']['sampling']['sample_steps']}"
    for step in STEPS:
        folder = plan / RUN / "samples" / str(step)
        images = np.load(folder / "images.npy")
        assert images.dtype == np.uint8 and images.shape == (N_SAMPLES, 1, 32, 32)
        provenance = json.loads((folder / "meta.json").read_text())["provenance"]
        assert provenance["checkpoint_step"] == step and provenance["sampler"] == sampler
        assert (folder / "sample_key.txt").is_file()
        notebook = nbformat.read(plan / RUN / f"03_sample-{step}.ipynb", as_version=4)
        assert glued(notebook)["sampler"] == repr(sampler)
        assert plotly_figures(notebook) == 1


def test_memorization_saves_exact_matches_and_report_rows(plan, cxr_sets):
    run = plan / RUN
    training, holdout = cxr_sets["training"], cxr_sets["holdout"]
    assert len(training) == 8
    holdout_max_r = float64_pearson(holdout.images, training.images).max(axis=1)
    for step in STEPS:
        samples = np.load(run / "samples" / str(step) / "images.npy")
        r = float64_pearson(samples, training.images)
        matches = np.load(run / "matches" / f"{step}.npz")
        np.testing.assert_array_equal(matches["all/indices"][:, 0], r.argmax(axis=1))
        np.testing.assert_allclose(matches["all/values"][:, 0], r.max(axis=1), atol=1e-6)
        np.testing.assert_allclose(matches["all/holdout_max_r"], holdout_max_r, atol=1e-6)
        [row] = json.loads((run / "reports" / f"{step}.json").read_text())
        assert (row["channel"], row["step"], row["model"], row["n_samples"]) == (
            "all",
            step,
            "ddpm",
            N_SAMPLES,
        )
        assert row["median_max_r"] == pytest.approx(np.median(r.max(axis=1)), abs=1e-6)
        assert row["holdout_p99"] == pytest.approx(np.quantile(holdout_max_r, 0.99), abs=1e-6)
        notebook = nbformat.read(run / f"04_memorization-{step}.ipynb", as_version=4)
        assert plotly_figures(notebook) == 2  # the ECDF and the top pairs
        assert any('class="msb"' in o.get("data", {}).get("text/html", "") for o in outputs(notebook))
        assert glued(notebook)["n_samples"] == str(N_SAMPLES)


def test_the_comparison_table_has_the_contract_columns_with_the_runs_values(plan):
    table = pd.read_csv(plan / "comparison.csv")
    assert list(table.columns[: len(CONTRACT_COLUMNS)]) == CONTRACT_COLUMNS
    rows = table[table["run_dir"] == RUN]
    assert rows["step"].tolist() == list(STEPS)
    for step, row in zip(STEPS, rows.itertuples(index=False), strict=True):
        [report] = json.loads((plan / RUN / "reports" / f"{step}.json").read_text())
        assert row.median_max_r == pytest.approx(report["median_max_r"])
        assert row.frac_likely_copies == pytest.approx(report["frac_likely_copies"])
    notebook = nbformat.read(plan / "05_compare.ipynb", as_version=4)
    assert plotly_figures(notebook) == 2  # against training-set size and against step
    assert glued(notebook)["n_runs"] == str(table["run_dir"].nunique())


def test_one_training_set_size_gives_no_size_curve(plan, tmp_path, jupyter_kernel):
    alone = copy_run(plan, tmp_path / "plan")
    notebook = execute("05_compare.ipynb", alone / "05_compare.ipynb", alone, jupyter_kernel)
    assert plotly_figures(notebook) == 1  # against step only
    markdown = [o["data"]["text/markdown"] for o in outputs(notebook) if "text/markdown" in o.get("data", {})]
    assert markdown == ["Every run trains on 8 subjects: no size curve."]
    assert glued(notebook)["n_runs"] == "1"
    assert pd.read_csv(alone / "comparison.csv")["step"].tolist() == list(STEPS)


def test_an_unknown_model_stops_training_before_anything_is_written(tmp_path, jupyter_kernel):
    error = error_of(
        tmp_path / "out.ipynb", jupyter_kernel, "02_train.ipynb", tmp_path, model="gan", run_dir="run"
    )
    assert error["ename"] == "ValueError"
    assert error["evalue"] == "unknown model 'gan'; expected one of ('ddpm', 'stylegan')"
    assert not (tmp_path / "run").exists()


def test_sampling_a_checkpoint_training_did_not_keep_names_the_kept_ones(plan, tmp_path, jupyter_kernel):
    folder = copy_run(plan, tmp_path / "plan")
    error = error_of(tmp_path / "out.ipynb", jupyter_kernel, "03_sample.ipynb", folder, run_dir=RUN, step=20)
    assert error["ename"] == "ValueError"
    assert error["evalue"] == f"step=20: {RUN} kept checkpoints at steps {list(STEPS)} only"


def test_memorization_on_other_training_data_says_the_data_changed(
    plan, smoke_study, tmp_path, jupyter_kernel
):
    folder = copy_run(plan, tmp_path / "plan")
    dataset = SMOKE.datasets["cxr-phantom"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMSTUDY_CACHE", smoke_study["env"]["MEMSTUDY_CACHE"])
        error = error_of(
            tmp_path / "out.ipynb",
            jupyter_kernel,
            "04_memorization.ipynb",
            folder,
            run_dir=RUN,
            step=STEPS[-1],
            dataset="cxr-phantom",
            data_options=dataset["options"],
            train_split="train",
            n_subjects=6,
            holdout_split=dataset["holdout_split"],
        )
    assert error["ename"] == "ValueError"
    assert "params.json: the training set loaded now" in error["evalue"]
    assert "6 images) is not the one this run trained on" in error["evalue"]
    assert "the data changed since training" in error["evalue"]
    assert not (folder / RUN / "reports" / f"{STEPS[-1]}.json").exists() or (
        (folder / RUN / "reports" / f"{STEPS[-1]}.json").read_bytes()
        == (plan / RUN / "reports" / f"{STEPS[-1]}.json").read_bytes()
    )


def test_comparing_a_missing_summary_names_it(tmp_path, jupyter_kernel):
    error = error_of(
        tmp_path / "out.ipynb", jupyter_kernel, "05_compare.ipynb", tmp_path, summaries=["gone/summary.json"]
    )
    assert error["ename"] == "FileNotFoundError"
    assert error["evalue"].startswith("gone/summary.json: no such file")
    assert not (tmp_path / "comparison.csv").exists()
