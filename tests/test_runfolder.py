"""The run folder: its layout, the training and sampling guards, and the readers and writers of each step."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memstudy.workflow import runfolder


def fake_run(run_dir: Path, checkpoints=(100, 200), key: str | None = None) -> Path:
    """A run folder as training leaves it: params.json and (empty) checkpoint files."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "params.json").write_text("{}")
    for step in checkpoints:
        (run_dir / "checkpoints" / f"step_{step:08d}.pt").write_bytes(b"weights")
    if key is not None:
        (run_dir / "run_key.txt").write_text(key + "\n")
    return run_dir


RECORD = {
    "steps": 200,
    "run_key": "k1",
    "model": "ddpm",
    "seed": 0,
    "dataset": "cxr-phantom",
    "n_subjects": 16,
    "n_train_images": 16,
}


def test_paths_follow_the_run_folder_contract(tmp_path):
    run = tmp_path / "cxr-phantom" / "ddpm" / "n16-s0"
    assert runfolder.train_record_path(run) == run / "train.json"
    assert runfolder.sample_path(run, 200) == run / "samples" / "200"
    assert runfolder.matches_path(run, 200) == run / "matches" / "200.npz"
    assert runfolder.report_path(run, np.int64(200)) == run / "reports" / "200.json"
    assert runfolder.summary_path(run) == run / "summary.json"


@pytest.mark.parametrize("step", [0, -5, "200", 2.0, True])
def test_a_step_that_is_not_a_positive_integer_is_refused(tmp_path, step):
    with pytest.raises(ValueError, match="step must be a positive integer"):
        runfolder.sample_path(tmp_path, step)


def test_a_new_run_folder_records_its_key(tmp_path):
    run = tmp_path / "run"
    assert runfolder.prepare_run(run, "k1", [100, 200]) == "new"
    assert (run / "run_key.txt").read_text().strip() == "k1"


def test_the_same_key_resumes_and_drops_the_finished_record(tmp_path):
    run = fake_run(tmp_path / "run", key="k1")
    (run / "train.json").write_text("{}")
    assert runfolder.prepare_run(run, "k1", [100, 200, 300]) == "resumed"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000100.pt", "step_00000200.pt"]
    assert not (run / "train.json").exists()
    assert not (tmp_path / "run.replaced").exists()


def test_another_key_moves_the_old_run_aside_and_logs_why(tmp_path, caplog):
    run = fake_run(tmp_path / "run", key="old")
    (tmp_path / "run.replaced").mkdir()
    (tmp_path / "run.replaced" / "older").write_text("an older replaced run")
    with caplog.at_level(logging.INFO, logger="memstudy.workflow.runfolder"):
        outcome = runfolder.prepare_run(run, "new", [100, 200])
    assert outcome == "replaced: it was trained under run key old, now new"
    assert sorted(p.name for p in run.iterdir()) == ["run_key.txt"]
    assert (run / "run_key.txt").read_text().strip() == "new"
    aside = tmp_path / "run.replaced"
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "params.json", "run_key.txt"]
    assert (aside / "run_key.txt").read_text().strip() == "old"
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(messages) == 1 and "run key old, now new" in messages[0]


def test_a_run_without_a_recorded_key_counts_as_a_different_run(tmp_path):
    run = fake_run(tmp_path / "run")
    outcome = runfolder.prepare_run(run, "k1", [100, 200])
    assert outcome.startswith("replaced: ") and "unknown run key" in outcome
    assert (tmp_path / "run.replaced" / "params.json").is_file()


def test_a_pruned_checkpoint_starts_the_run_over_but_one_still_ahead_does_not(tmp_path):
    ahead = fake_run(tmp_path / "ahead", checkpoints=(200,), key="k1")
    assert runfolder.prepare_run(ahead, "k1", [200, 400]) == "resumed"
    pruned = fake_run(tmp_path / "pruned", checkpoints=(200,), key="k1")
    outcome = runfolder.prepare_run(pruned, "k1", [100, 200])
    assert outcome == "replaced: checkpoint(s) [100] were pruned (newest kept: step 200); resuming lacks them"
    assert not (pruned / "checkpoints").exists()
    assert (tmp_path / "pruned.replaced" / "checkpoints" / "step_00000200.pt").is_file()


def test_without_a_key_an_existing_run_is_kept_and_its_key_left_alone(tmp_path):
    run = fake_run(tmp_path / "run", key="workflow-key")
    assert runfolder.prepare_run(run, None, [100, 200]) == "resumed"
    assert (run / "run_key.txt").read_text().strip() == "workflow-key"
    assert runfolder.prepare_run(tmp_path / "fresh", None, [100]) == "new"
    assert not (tmp_path / "fresh" / "run_key.txt").exists()


def test_the_train_record_round_trips_and_lists_checkpoints_sorted(tmp_path):
    run = fake_run(tmp_path / "run")
    runfolder.write_train_record(run, checkpoints=[200, 100], extra="kept", **RECORD)
    assert runfolder.read_train_record(run) == {**RECORD, "checkpoints": [100, 200], "extra": "kept"}


def test_the_train_record_needs_its_fields_and_existing_checkpoints(tmp_path):
    run = fake_run(tmp_path / "run", checkpoints=(200,))
    fields = {k: v for k, v in RECORD.items() if k != "n_train_images"}
    with pytest.raises(ValueError, match="needs n_train_images"):
        runfolder.write_train_record(run, checkpoints=[200], **fields)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step\(s\) \[100\]"):
        runfolder.write_train_record(run, checkpoints=[100, 200], **RECORD)
    assert not (run / "train.json").exists()


def test_a_missing_train_record_says_training_has_not_finished(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run/train\.json.*02_train\) has not finished"):
        runfolder.read_train_record(tmp_path / "run")


def test_a_checkpoint_training_did_not_keep_is_named_with_the_kept_ones(tmp_path):
    run = fake_run(tmp_path / "run")
    runfolder.write_train_record(run, checkpoints=[100, 200], **RECORD)
    assert runfolder.require_checkpoint(run, 100)["model"] == "ddpm"
    with pytest.raises(ValueError, match=r"step=150: .* kept checkpoints at steps \[100, 200\] only"):
        runfolder.require_checkpoint(run, 150)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "gan"}, r"unknown model 'gan'; expected one of \('ddpm', 'stylegan'\)"),
        ({"config": "huge"}, r"unknown ddpm config 'huge'"),
        ({"overrides": {"bogus": 1}}, r"unknown DDPMConfig fields \['bogus'\]"),
        ({"overrides": {"keep_checkpoints": [5]}}, "as checkpoints=, not keep_checkpoints"),
        ({"checkpoints": [0, 200]}, r"within 1\.\.steps=200 \(\[0\] not\)"),
        ({"checkpoints": [100, 300]}, r"within 1\.\.steps=200 \(\[300\] not\)"),
        ({"checkpoints": []}, "a non-empty list"),
        ({"steps": 0}, "steps must be a positive integer"),
    ],
)
def test_bad_training_parameters_are_named(kwargs, message):
    arguments = {"model": "ddpm", "config": "tiny", "overrides": {}, "steps": 200, "checkpoints": [100, 200]}
    with pytest.raises(ValueError, match=message):
        runfolder.check_train_parameters(**{**arguments, **kwargs})


def test_good_training_parameters_give_the_checkpoints_sorted_once():
    assert runfolder.check_train_parameters("stylegan", "tiny", {"batch_size": 4}, 200, [200, 50, 200]) == [
        50,
        200,
    ]


def test_samples_are_drawn_reused_or_replaced_by_their_key(tmp_path):
    run = tmp_path / "run"
    assert runfolder.prepare_samples(run, 100, "s1") == "new"
    out = runfolder.sample_path(run, 100)
    out.mkdir(parents=True)
    (out / "images.npy").write_bytes(b"images")
    runfolder.write_sample_key(run, 100, "s1")
    assert runfolder.prepare_samples(run, 100, "s1") == "reused"
    assert (out / "images.npy").is_file()
    assert runfolder.prepare_samples(run, 100, "s2") == "replaced: drawn under sample key s1, now s2"
    assert not out.exists()
    assert (out.parent / "100.replaced" / "images.npy").is_file()


def test_existing_samples_without_a_key_are_replaced_under_the_workflow_and_refused_by_hand(tmp_path):
    run = tmp_path / "run"
    out = runfolder.sample_path(run, 100)
    out.mkdir(parents=True)
    with pytest.raises(
        FileExistsError, match=r"samples/100 exists: step 100 of this run was sampled already"
    ):
        runfolder.prepare_samples(run, 100, None)
    assert out.is_dir()
    assert runfolder.prepare_samples(run, 100, "s1") == "replaced: no sample_key.txt"


def test_samples_are_read_only_from_their_own_checkpoint(tmp_path):
    from memstudy.data import ImageSet

    run = tmp_path / "run"
    with pytest.raises(
        FileNotFoundError, match=r"no samples; run the sampling step \(03_sample\) for step 100"
    ):
        runfolder.read_samples(run, 100)
    images = np.arange(2 * 16, dtype=np.uint8).reshape(2, 1, 4, 4)
    ImageSet(images, ["a", "b"], [0, 1], ["gray"], {"checkpoint_step": 100}).save(
        runfolder.sample_path(run, 100)
    )
    np.testing.assert_array_equal(runfolder.read_samples(run, 100).images, images)
    ImageSet(images, ["a", "b"], [0, 1], ["gray"], {"checkpoint_step": 100}).save(
        runfolder.sample_path(run, 200)
    )
    with pytest.raises(ValueError, match="drawn at step 100, not 200"):
        runfolder.read_samples(run, 200)


def test_the_training_set_must_be_the_one_the_run_trained_on(tmp_path, blobs):
    from memstudy.models.runs import dataset_fingerprint

    run = tmp_path / "run"
    run.mkdir()
    (run / "params.json").write_text(json.dumps({"dataset": {"fingerprint": dataset_fingerprint(blobs)}}))
    runfolder.check_training_set(run, blobs)
    with pytest.raises(
        ValueError, match=r"params\.json: the training set loaded now .*3 images.*data changed"
    ):
        runfolder.check_training_set(run, blobs.subset([0, 1, 2]))


def test_matches_round_trip_exactly_with_their_dtypes(tmp_path):
    path = tmp_path / "matches" / "200.npz"
    arrays = {
        "all/values": np.array([[0.9, 0.5]], dtype=np.float32),
        "all/indices": np.array([[3, 1]], dtype=np.int64),
        "all/likely_copy": np.array([True]),
        "all/transform": np.array(["mirror"]),
        "all/threshold": np.float64(0.75),
    }
    runfolder.save_matches(path, **arrays)
    loaded = runfolder.load_matches(path)
    assert sorted(loaded) == sorted(arrays)
    for name, value in arrays.items():
        assert loaded[name].dtype == np.asarray(value).dtype
        np.testing.assert_array_equal(loaded[name], value)
    assert [p.name for p in path.parent.iterdir()] == ["200.npz"]


def test_matches_refuse_python_objects_and_name_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"\['all/names'\] hold Python objects"):
        runfolder.save_matches(tmp_path / "m.npz", **{"all/names": np.array(["a", None], dtype=object)})
    assert not (tmp_path / "m.npz").exists()
    with pytest.raises(FileNotFoundError, match=r"m\.npz: no such file; run the memorization step"):
        runfolder.load_matches(tmp_path / "m.npz")


def test_report_arrays_hold_each_channels_per_sample_values(training_images):
    from memstudy.analysis import memorization_report
    from memstudy.data import ImageSet

    holdout = ImageSet(
        training_images.images[::-1, :, ::-1].copy(), list("uvwxyz"), range(10, 16), ["a", "b"]
    )
    synthetic = training_images.images[[0, 0, 3]]
    report = memorization_report(synthetic, training_images, holdout, channel="a", k=2)
    arrays = runfolder.report_arrays({"a": report})
    assert {name.split("/")[0] for name in arrays} == {"a"}
    assert {name.split("/")[1] for name in arrays} == set(runfolder.MATCH_ARRAYS)
    assert arrays["a/values"].dtype == np.float32 and arrays["a/values"].shape == (3, 2)
    # Exact copies of training images 0 and 3: r = 1 with them, and called copies by the report.
    np.testing.assert_array_equal(arrays["a/indices"][:, 0], [0, 0, 3])
    np.testing.assert_allclose(arrays["a/max_r"], 1.0, atol=1e-6)
    expected = (report.max_r > report.threshold) & (report.margin > report.margin_threshold)
    np.testing.assert_array_equal(arrays["a/likely_copy"], expected)
    np.testing.assert_array_equal(arrays["a/train_max_r"], report.train_max_r)
    assert arrays["a/threshold"].shape == ()


def test_report_rows_are_valid_json_with_nan_as_null(tmp_path):
    path = tmp_path / "reports" / "200.json"
    rows = [
        {"step": np.int64(200), "median_max_r": np.float32(0.5), "p": float("nan"), "inf": np.inf, "x": "a"},
        {"values": np.array([0.25, np.nan]), "flag": np.bool_(True), "pair": (1, np.float64(np.nan))},
    ]
    runfolder.write_report_rows(path, rows)

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads(path.read_text(), parse_constant=refuse) == [
        {"step": 200, "median_max_r": 0.5, "p": None, "inf": None, "x": "a"},
        {"values": [0.25, None], "flag": True, "pair": [1, None]},
    ]


def test_the_run_summary_merges_reports_in_step_order(tmp_path):
    run = fake_run(tmp_path / "run")
    runfolder.write_train_record(run, checkpoints=[100, 200], **RECORD)
    runfolder.write_report_rows(runfolder.report_path(run, 200), [{"step": 200, "channel": "t1"}])
    runfolder.write_report_rows(
        runfolder.report_path(run, 100), [{"step": 100, "channel": "t1"}, {"step": 100, "channel": "all"}]
    )
    path = runfolder.write_run_summary(run, [200, 100])
    summary = json.loads(path.read_text())
    assert summary["run"] == {**RECORD, "checkpoints": [100, 200]}
    assert [(r["step"], r["channel"]) for r in summary["rows"]] == [(100, "t1"), (100, "all"), (200, "t1")]


def test_a_missing_report_is_named(tmp_path):
    run = fake_run(tmp_path / "run")
    runfolder.write_train_record(run, checkpoints=[100, 200], **RECORD)
    runfolder.write_report_rows(runfolder.report_path(run, 100), [{"step": 100}])
    with pytest.raises(
        FileNotFoundError, match=r"reports/200\.json: no such file; run the memorization step"
    ):
        runfolder.write_run_summary(run, [100, 200])
    assert not runfolder.summary_path(run).exists()


def test_summaries_are_found_at_run_depth_and_read_with_their_run_folder(tmp_path):
    for run, rows in (("a/ddpm/n8-s0", [{"step": 10}]), ("a/ddpm/n16-s0", [{"step": 10}, {"step": 20}])):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "summary.json").write_text(json.dumps({"run": {}, "rows": rows}))
    (tmp_path / "summary.json").write_text("{}")  # not at run depth
    found = runfolder.find_summaries(tmp_path)
    assert found == [tmp_path / "a/ddpm/n16-s0/summary.json", tmp_path / "a/ddpm/n8-s0/summary.json"]
    rows = runfolder.read_summaries(found)
    assert [(Path(r["run_dir"]).name, r["step"]) for r in rows] == [
        ("n16-s0", 10),
        ("n16-s0", 20),
        ("n8-s0", 10),
    ]


def test_runs_made_by_hand_get_their_summary_written_from_their_reports(tmp_path):
    run = fake_run(tmp_path / "run")
    runfolder.write_train_record(run, checkpoints=[100, 200], **RECORD)
    for step in (200, 100):
        runfolder.write_report_rows(runfolder.report_path(run, step), [{"step": step}])
    (found,) = runfolder.find_summaries(tmp_path)
    assert found == runfolder.summary_path(run)
    assert [row["step"] for row in json.loads(found.read_text())["rows"]] == [100, 200]


def test_missing_or_malformed_summaries_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run summaries"):
        runfolder.find_summaries(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nowhere/summary\.json: no such file"):
        runfolder.read_summaries([tmp_path / "nowhere" / "summary.json"])
    (tmp_path / "bad.json").write_text('{"rows": 3}')
    with pytest.raises(ValueError, match=r"bad\.json: not a run summary"):
        runfolder.read_summaries([tmp_path / "bad.json"])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        runfolder.read_summaries([tmp_path / "broken.json"])


def test_sample_values_follow_the_table_rows(tmp_path):
    for step, values in ((10, [0.1, 0.2]), (20, [0.3, 0.4])):
        runfolder.save_matches(
            runfolder.matches_path(tmp_path, step),
            **{"all/max_r": np.array(values), "all/likely_copy": np.array([False, True])},
        )
    table = pd.DataFrame({"run_dir": [str(tmp_path)] * 2, "step": [20, 10], "channel": ["all", "all"]})
    loaded = runfolder.load_sample_values(table)
    np.testing.assert_array_equal(loaded[0]["max_r"], [0.3, 0.4])
    np.testing.assert_array_equal(loaded[1]["max_r"], [0.1, 0.2])
    np.testing.assert_array_equal(loaded[1]["likely_copy"], [False, True])
    with pytest.raises(ValueError, match="no arrays for channel 't1'"):
        runfolder.load_sample_values(table.assign(channel="t1"))


def test_study_timing_sums_the_executed_notebooks_and_spans_their_times(tmp_path):
    def executed(path: Path, start: str, end: str, duration: float | None) -> None:
        record = {"start_time": start, "end_time": end, "duration": duration}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"cells": [], "metadata": {"papermill": record}}))

    executed(tmp_path / "d" / "01_data.ipynb", "2026-12-01T10:00:00+00:00", "2026-12-01T10:01:00+00:00", 60.0)
    executed(
        tmp_path / "d" / "m" / "r" / "02_train.ipynb",
        "2026-12-01T10:00:30+00:00",
        "2026-12-01T10:05:00+00:00",
        270.0,
    )
    # Left out: a failed job's partial notebook, one being written, a replaced run, one still running.
    for left_out in (
        "r/03_sample-1.failed.ipynb",
        "r/.03_sample-1.ipynb.x.tmp.ipynb",
        "q.replaced/02_train.ipynb",
    ):
        executed(
            tmp_path / "d" / "m" / left_out, "2026-11-30T09:00:00+00:00", "2026-12-01T12:00:00+00:00", 9.0
        )
    executed(tmp_path / "d" / "m" / "r" / "04_memorization-1.ipynb", "2026-12-01T10:06:00+00:00", "", None)
    (tmp_path / "notes.ipynb").write_text("not json")
    timing = runfolder.study_timing(tmp_path)
    assert {k: timing[k] for k in ("n_notebooks", "notebook_seconds", "span_seconds")} == {
        "n_notebooks": 2,
        "notebook_seconds": 330.0,
        "span_seconds": 300.0,
    }
    assert runfolder.study_timing(tmp_path / "d" / "none")["n_notebooks"] == 0
