"""The study runner: plans expand into papermill executions, reruns skip, failures stay contained."""

from __future__ import annotations

import nbformat
import pytest

from memstudy.study import StudyError, load_plan, run_plan


@pytest.fixture(scope="module")
def study_cache(tmp_path_factory):
    """One data cache for this module, so the cxr phantom is generated once."""
    return tmp_path_factory.mktemp("study-cache")


@pytest.fixture(autouse=True)
def shared_cache(study_cache, monkeypatch):
    monkeypatch.setenv("MEMSTUDY_CACHE", str(study_cache))


def write_plan(tmp_path, text):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return path


def test_a_plan_executes_the_data_notebook_and_a_rerun_skips_it(tmp_path, jupyter_kernel):
    plan = write_plan(tmp_path, "data:\n  - {dataset: cxr-phantom, size: 32, n_subjects: 6}\n")
    first = run_plan(plan, output_dir=tmp_path / "out")
    output = tmp_path / "out" / "01_data-cxr-phantom.ipynb"
    assert first["executed"] == [output]
    notebook = nbformat.read(output, as_version=4)
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    glued = {
        o["metadata"]["scrapbook"]["name"]: o["data"] for o in outputs if "scrapbook" in o.get("metadata", {})
    }
    assert set(glued) == {"n_images", "n_subjects", "other_r", "adjacent_r"}
    assert glued["n_images"]["application/papermill.record/text/plain"] == "6"
    assert any("plotly-graph-div" in o.get("data", {}).get("text/html", "") for o in outputs)
    assert notebook.metadata["memstudy"]["parameters"] == {
        "dataset": "cxr-phantom",
        "size": 32,
        "n_subjects": 6,
    }
    again = run_plan(plan, output_dir=tmp_path / "out")
    assert again == {"executed": [], "skipped": [output], "failed": []}


def test_a_failing_execution_is_kept_and_does_not_stop_the_others(tmp_path, jupyter_kernel):
    plan = write_plan(
        tmp_path,
        "data:\n  - {dataset: chestxray, root: /nonexistent, size: 32}\n"
        "  - {dataset: cxr-phantom, size: 32, n_subjects: 6}\n",
    )
    with pytest.raises(StudyError, match="1 of 2 executions failed"):
        run_plan(plan, output_dir=tmp_path / "out")
    assert (tmp_path / "out" / "01_data-chestxray.failed.ipynb").is_file()
    assert not (tmp_path / "out" / "01_data-chestxray.ipynb").exists()
    assert (tmp_path / "out" / "01_data-cxr-phantom.ipynb").is_file()


def test_plans_with_unknown_steps_or_parameters_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="a plan maps steps"):
        load_plan(write_plan(tmp_path, "training:\n  - {dataset: x}\n"))
    with pytest.raises(ValueError, match=r"data entry 1 has unknown parameters \['sise'\]"):
        load_plan(write_plan(tmp_path, "data:\n  - {dataset: cxr-phantom, sise: 32}\n"))
    with pytest.raises(FileNotFoundError, match="no such plan file"):
        load_plan(tmp_path / "missing.yaml")
