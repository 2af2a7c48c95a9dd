"""The step notebooks 02–05 execute through papermill at a tiny size, chained as the workflow chains them
(train → sample → memorization → compare, in one plan folder), and a bad parameter of each stops its
notebook with an error cell that says what was wrong."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import papermill
import pytest
from conftest import float64_pearson, write_xray

import memstudy
from memstudy.workflow import runfolder

NOTEBOOKS = Path(memstudy.__file__).parent / "notebooks"
RUN = "chestxray/ddpm/n8-s0"
STEPS = (10, 20)
N_SAMPLES = 6
DATA = {"dataset": "chestxray", "data_options": {"size": 16}, "train_split": "train", "n_subjects": 8}
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


@pytest.fixture(scope="module")
def xray_root(tmp_path_factory) -> Path:
    """A Kermany layout with one radiograph per patient: 8 training patients, 12 other test patients."""
    root = tmp_path_factory.mktemp("xrays") / "chest_xray"
    for split, first, count in (("train", 0, 8), ("test", 100, 12)):
        for i in range(first, first + count):
            name = f"NORMAL/IM-{i:04d}-0001.jpeg" if i % 2 else f"PNEUMONIA/person{i}_bacteria_1.jpeg"
            write_xray(root / split / name, (40, 40), seed=i)
    return root


@pytest.fixture(scope="module")
def plan(tmp_path_factory, xray_root, jupyter_kernel) -> Path:
    """A plan folder holding one run, trained, sampled and measured at two checkpoints, and compared."""
    plan = tmp_path_factory.mktemp("plan")
    data = {**DATA, "root": str(xray_root)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMSTUDY_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setenv("OMP_NUM_THREADS", "1")  # tiny models: a second thread only spins
        execute(
            "02_train.ipynb",
            plan / RUN / "02_train.ipynb",
            plan,
            jupyter_kernel,
            **data,
            model="ddpm",
            config="tiny",
            overrides={"batch_size": 4, "base_channels": 8, "channel_mult": [1, 2]},
            steps=STEPS[-1],
            checkpoints=list(STEPS),
            seed=0,
            device="cpu",
            run_dir=RUN,
            run_key="key-1",
        )
        for step in STEPS:
            execute(
                "03_sample.ipynb",
                plan / RUN / f"03_sample-{step}.ipynb",
                plan,
                jupyter_kernel,
                run_dir=RUN,
                step=step,
                n_samples=N_SAMPLES,
                sampler=None,
                sample_steps=5,
                seed=0,
                device="cpu",
                sample_key=f"samples-{step}",
            )
            execute(
                "04_memorization.ipynb",
                plan / RUN / f"04_memorization-{step}.ipynb",
                plan,
                jupyter_kernel,
                run_dir=RUN,
                step=step,
                **data,
                holdout_split="test",
                channels=[None],
                k=3,
                max_browser_images=4,
            )
        runfolder.write_run_summary(plan / RUN, STEPS)  # the workflow's summary rule
        execute("05_compare.ipynb", plan / "05_compare.ipynb", plan, jupyter_kernel)
    return plan


@pytest.mark.slow
def test_training_keeps_the_checkpoints_and_records_the_run(plan):
    run = plan / RUN
    record = json.loads((run / "train.json").read_text())
    assert {k: record[k] for k in ("steps", "checkpoints", "run_key", "model", "n_subjects")} == {
        "steps": 20,
        "checkpoints": [10, 20],
        "run_key": "key-1",
        "model": "ddpm",
        "n_subjects": 8,
    }
    assert record["n_train_images"] == 8  # one radiograph per patient in the fixture
    assert (run / "run_key.txt").read_text().strip() == "key-1"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000010.pt", "step_00000020.pt"]
    notebook = nbformat.read(run / "02_train.ipynb", as_version=4)
    values = glued(notebook)
    assert values["n_train_images"] == "8" and values["outcome"] == "'new'" and values["kept"] == "'10, 20'"
    assert plotly_figures(notebook) == 1  # the loss curve


@pytest.mark.slow
def test_sampling_writes_an_image_set_per_checkpoint_with_its_provenance(plan):
    for step in STEPS:
        folder = plan / RUN / "samples" / str(step)
        images = np.load(folder / "images.npy")
        assert images.dtype == np.uint8 and images.shape == (N_SAMPLES, 1, 16, 16)
        provenance = json.loads((folder / "meta.json").read_text())["provenance"]
        assert provenance["checkpoint_step"] == step and provenance["sampler"] == "ancestral-5"
        assert (folder / "sample_key.txt").read_text().strip() == f"samples-{step}"
        notebook = nbformat.read(plan / RUN / f"03_sample-{step}.ipynb", as_version=4)
        assert glued(notebook)["sampler"] == "'ancestral-5'"
        assert plotly_figures(notebook) == 1


@pytest.mark.slow
def test_memorization_saves_exact_matches_and_report_rows(plan, xray_root):
    from memstudy.data import load_dataset

    run = plan / RUN
    training = load_dataset("chestxray", root=xray_root, split="train", size=16, n_subjects=8, progress=False)
    holdout = load_dataset("chestxray", root=xray_root, split="test", size=16, progress=False)
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


@pytest.mark.slow
def test_the_comparison_table_has_the_contract_columns_with_the_runs_values(plan):
    table = pd.read_csv(plan / "comparison.csv")
    assert list(table.columns[: len(CONTRACT_COLUMNS)]) == CONTRACT_COLUMNS
    assert table["step"].tolist() == list(STEPS)
    for step, row in zip(STEPS, table.itertuples(index=False), strict=True):
        [report] = json.loads((plan / RUN / "reports" / f"{step}.json").read_text())
        assert row.median_max_r == pytest.approx(report["median_max_r"])
        assert row.frac_likely_copies == pytest.approx(report["frac_likely_copies"])
        assert row.run_dir == RUN
    notebook = nbformat.read(plan / "05_compare.ipynb", as_version=4)
    assert plotly_figures(notebook) == 1  # against step; one training-set size gives no size curve
    markdown = [o["data"]["text/markdown"] for o in outputs(notebook) if "text/markdown" in o.get("data", {})]
    assert markdown == ["Every run trains on 8 subjects: no size curve."]
    assert glued(notebook)["n_runs"] == "1"


@pytest.mark.slow
def test_an_unknown_model_stops_training_before_anything_is_written(tmp_path, jupyter_kernel):
    error = error_of(
        tmp_path / "out.ipynb", jupyter_kernel, "02_train.ipynb", tmp_path, model="gan", run_dir="run"
    )
    assert error["ename"] == "ValueError"
    assert error["evalue"] == "unknown model 'gan'; expected one of ('ddpm', 'stylegan')"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sampling_a_checkpoint_training_did_not_keep_names_the_kept_ones(plan, tmp_path, jupyter_kernel):
    error = error_of(tmp_path / "out.ipynb", jupyter_kernel, "03_sample.ipynb", plan, run_dir=RUN, step=15)
    assert error["ename"] == "ValueError"
    assert error["evalue"] == f"step=15: {RUN} kept checkpoints at steps [10, 20] only"


@pytest.mark.slow
def test_memorization_on_other_training_data_says_the_data_changed(plan, xray_root, tmp_path, jupyter_kernel):
    error = error_of(
        tmp_path / "out.ipynb",
        jupyter_kernel,
        "04_memorization.ipynb",
        plan,
        run_dir=RUN,
        step=20,
        **{**DATA, "root": str(xray_root), "n_subjects": 6},
        holdout_split="test",
    )
    assert error["ename"] == "ValueError"
    assert "params.json: the training set loaded now" in error["evalue"]
    assert "6 images) is not the one this run trained on" in error["evalue"]
    assert "the data changed since training" in error["evalue"]


@pytest.mark.slow
def test_comparing_a_missing_summary_names_it(tmp_path, jupyter_kernel):
    error = error_of(
        tmp_path / "out.ipynb", jupyter_kernel, "05_compare.ipynb", tmp_path, summaries=["gone/summary.json"]
    )
    assert error["ename"] == "FileNotFoundError"
    assert error["evalue"].startswith("gone/summary.json: no such file")
    assert not (tmp_path / "comparison.csv").exists()
