"""The run folder: where each step of the study writes, and the small readers and writers its notebooks share.

Paths are relative to the plan's folder ``runs/<plan>/``, the step notebooks' working folder::

    <dataset>/<model>/<run-id>/
        run_key.txt            the workflow's key of what decides the weights (prepare_run)
        params.json, log.json, checkpoints/step_XXXXXXXX.pt     memstudy.models.train
        train.json             02_train, written last: its presence means training finished
        02_train.ipynb
        samples/<step>/        03_sample: an ImageSet (sample_key.txt inside when the workflow drew it)
        03_sample-<step>.ipynb
        matches/<step>.npz     04_memorization: per-sample arrays, one group per channel (MATCH_ARRAYS)
        reports/<step>.json    04_memorization: one summary row per channel reported
        04_memorization-<step>.ipynb
        summary.json           {"run": train.json's fields, "rows": every report row, steps ascending}
    comparison.csv, 05_compare.ipynb

Every file is written atomically (:mod:`memstudy.atomic`). Importing this module is cheap; what needs
torch or the analysis is imported where it is used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memstudy.atomic import atomic_open, atomic_path, write_json

if TYPE_CHECKING:
    import pandas as pd

    from memstudy.analysis import MemorizationReport
    from memstudy.data import ImageSet

logger = logging.getLogger(__name__)

TRAIN_RECORD = "train.json"
RUN_KEY_FILE = "run_key.txt"
SAMPLE_KEY_FILE = "sample_key.txt"
SUMMARY_FILE = "summary.json"
REPLACED_SUFFIX = ".replaced"
#: What ``train.json`` must hold (02_train writes more where it knows more).
TRAIN_RECORD_FIELDS = (
    "steps",
    "checkpoints",
    "run_key",
    "model",
    "seed",
    "dataset",
    "n_subjects",
    "n_train_images",
)
#: The arrays of ``matches/<step>.npz``, each stored as ``"<channel>/<name>"`` for every channel reported
#: (``all`` for all channels together). N: synthetic images, k: matches kept, H: held-out images,
#: T: training images left after dedup.
MATCH_ARRAYS = {
    "values": "float32 (N, k): each synthetic image's top-k r with the training set, descending",
    "indices": "int64 (N, k): the training indices of those matches (-1: none)",
    "max_r": "float64 (N,): best r over the transforms scored (NaN for a constant image)",
    "margin": "float64 (N,): max_r minus the best r with any image of another subject",
    "transform": "str (N,): the transform that gave max_r (identity without transforms)",
    "likely_copy": "bool (N,): the calibrated copy call",
    "holdout_values": "float32 (H, k): each held-out image's top-k r with the training set",
    "holdout_indices": "int64 (H, k): the training indices of those matches",
    "holdout_max_r": "float64 (H,): each held-out image's best r with the training set",
    "holdout_margin": "float64 (H,): its margin, as for the synthetic images",
    "train_values": "float32 (T, k): each training image's top-k r with other subjects' images",
    "train_indices": "int64 (T, k): the training indices of those matches (-1: none, e.g. one subject)",
    "train_max_r": "float64 (T,): each training image's best r with other subjects' images",
    "threshold": "float64 (): the quantile of holdout_max_r that calibrates the call",
    "margin_threshold": "float64 (): the same quantile of holdout_margin",
}


def _step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 1:
        raise ValueError(f"step must be a positive integer (a training step), got {step!r}")
    return int(step)


def train_record_path(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/train.json``: the record 02_train writes last."""
    return Path(run_dir) / TRAIN_RECORD


def sample_path(run_dir: str | os.PathLike, step: int) -> Path:
    """``<run_dir>/samples/<step>``: the ImageSet folder of the samples drawn at ``step``."""
    return Path(run_dir) / "samples" / str(_step(step))


def matches_path(run_dir: str | os.PathLike, step: int) -> Path:
    """``<run_dir>/matches/<step>.npz``: the per-sample arrays of the memorization step."""
    return Path(run_dir) / "matches" / f"{_step(step)}.npz"


def report_path(run_dir: str | os.PathLike, step: int) -> Path:
    """``<run_dir>/reports/<step>.json``: the memorization step's summary rows."""
    return Path(run_dir) / "reports" / f"{_step(step)}.json"


def summary_path(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/summary.json``: every report row of the run."""
    return Path(run_dir) / SUMMARY_FILE


def _read_json(path: Path, kind: type, what: str, missing_hint: str) -> Any:
    """Read a JSON file that must hold a ``kind``; errors name the file and what was expected."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; {missing_hint}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); expected {what}") from error
    if not isinstance(value, kind):
        raise ValueError(f"{path}: expected {what}, found a JSON {type(value).__name__}")
    return value


def _move_aside(folder: Path, why: str) -> None:
    """Move ``folder`` to ``<folder>.replaced`` (replacing an older one) and log why."""
    aside = folder.with_name(folder.name + REPLACED_SUFFIX)
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(folder, aside)
    logger.info("moved %s aside to %s: %s", folder, aside.name, why)


def check_train_parameters(
    model: str, config: Any, overrides: Mapping[str, Any], steps: int, checkpoints: Sequence[int]
) -> list[int]:
    """Check 02_train's parameters before anything is loaded; return the checkpoints sorted.

    Raises
    ------
    ValueError
        An unknown model, config or config field (with the expected values), a bad field value, a
        checkpoint outside 1..``steps``, or ``keep_checkpoints`` given in ``overrides`` (the notebook
        keeps ``checkpoints``).
    """
    from memstudy.models.configs import resolve_config

    resolve_config(model, config, **overrides)
    if "keep_checkpoints" in overrides:
        raise ValueError("overrides: give the checkpoints to keep as checkpoints=, not keep_checkpoints")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    bad = [c for c in checkpoints if isinstance(c, bool) or not isinstance(c, int | np.integer)]
    bad += [c for c in checkpoints if c not in bad and not 1 <= c <= steps]
    if bad or not checkpoints:
        raise ValueError(
            f"checkpoints={list(checkpoints)}: expected a non-empty list of steps within 1..steps={steps}"
            + (f" ({bad} not)" if bad else "")
        )
    return sorted({int(c) for c in checkpoints})


def prepare_run(run_dir: str | os.PathLike, run_key: str | None, checkpoints: Iterable[int]) -> str:
    """Make ``run_dir`` ready for training: keep a run that can resume, move any other aside.

    Parameters
    ----------
    run_dir : path
        The run folder (``memstudy.models.train`` resumes from its newest checkpoint).
    run_key : str or None
        The workflow's hash of everything that decides the weights except the length of training. A run
        recorded under another key (``run_key.txt``), or with ``params.json`` but no key (unknown), is
        a different run. None (a notebook run by hand): no key check, and no key is written.
    checkpoints : iterable of int
        The steps training must keep. One that is missing although the run has a checkpoint at or after
        it was pruned, and resuming cannot bring it back, so the run is started over.

    Returns
    -------
    str
        ``"new"`` (no earlier run), ``"resumed"`` (the earlier run is kept), or
        ``"replaced: <why>"``: the old folder was moved to ``<run_dir>.replaced/`` (replacing an older
        one of that name), with one INFO log line saying why.

    Notes
    -----
    An existing ``train.json`` is removed before training continues, since it describes a training that
    is about to change; 02_train writes it again at the end.
    """
    from memstudy.models.runs import PARAMS_FILE, list_checkpoints

    run_dir = Path(run_dir)
    existing = (run_dir / PARAMS_FILE).is_file() or bool(list_checkpoints(run_dir))
    why = None
    if existing and run_key is not None:
        key_file = run_dir / RUN_KEY_FILE
        old_key = key_file.read_text().strip() if key_file.is_file() else None
        if old_key is None:
            why = f"it was trained under an unknown run key (no {RUN_KEY_FILE})"
        elif old_key != run_key:
            why = f"it was trained under run key {old_key}, now {run_key}"
    if existing and why is None:
        kept = list_checkpoints(run_dir)
        pruned = [c for c in sorted(set(checkpoints)) if c not in kept and c <= max(kept, default=0)]
        if pruned:
            why = f"checkpoint(s) {pruned} were pruned (newest kept: step {max(kept)}); resuming lacks them"
    if why is not None:
        _move_aside(run_dir, why)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_record_path(run_dir).unlink(missing_ok=True)
    if run_key is not None:
        with atomic_open(run_dir / RUN_KEY_FILE) as handle:
            handle.write(f"{run_key}\n")
    return f"replaced: {why}" if why else ("resumed" if existing else "new")


def write_train_record(run_dir: str | os.PathLike, **fields: Any) -> None:
    """Write ``train.json``, the sign that training finished.

    ``fields`` must include :data:`TRAIN_RECORD_FIELDS`; ``checkpoints`` lists kept steps, each of
    which must exist in ``checkpoints/``.

    Raises
    ------
    ValueError
        A required field is missing.
    FileNotFoundError
        A listed checkpoint is not there.
    """
    from memstudy.models.runs import checkpoint_path

    missing = [name for name in TRAIN_RECORD_FIELDS if name not in fields]
    if missing:
        raise ValueError(f"the training record needs {', '.join(missing)} as well")
    steps = [_step(s) for s in fields["checkpoints"]]
    absent = [s for s in steps if not checkpoint_path(run_dir, s).is_file()]
    if absent:
        raise FileNotFoundError(f"{run_dir}: no checkpoint at step(s) {absent}; training did not keep them")
    write_json(train_record_path(run_dir), {**fields, "checkpoints": sorted(steps)})


def read_train_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``train.json``.

    Raises
    ------
    FileNotFoundError
        There is none: the training step (02_train) has not finished for this run.
    """
    path = train_record_path(run_dir)
    hint = "the training step (02_train) has not finished for this run"
    return _read_json(path, dict, "a training record (a JSON object)", hint)


def require_checkpoint(run_dir: str | os.PathLike, step: int) -> dict[str, Any]:
    """Return the run's training record after checking that training kept ``step``.

    Raises
    ------
    FileNotFoundError
        Training has not finished (:func:`read_train_record`).
    ValueError
        ``step`` is not one of the checkpoints training kept (they are listed).
    """
    record = read_train_record(run_dir)
    if _step(step) not in record["checkpoints"]:
        raise ValueError(f"step={step}: {run_dir} kept checkpoints at steps {record['checkpoints']} only")
    return record


def prepare_samples(run_dir: str | os.PathLike, step: int, sample_key: str | None) -> str:
    """Decide what 03_sample does with an existing ``samples/<step>`` folder.

    Parameters
    ----------
    sample_key : str or None
        The workflow's hash of the run's key and the sampling settings. None (a notebook run by hand):
        an existing folder is an error, since sampling never overwrites.

    Returns
    -------
    str
        ``"new"`` (no folder: draw), ``"reused"`` (drawn before under the same key: load it) or
        ``"replaced: <why>"`` (drawn under another or no key: moved to ``<step>.replaced``; draw).

    Raises
    ------
    FileExistsError
        The folder exists and ``sample_key`` is None.
    """
    out = sample_path(run_dir, step)
    if not out.exists():
        return "new"
    if sample_key is None:
        raise FileExistsError(
            f"{out} exists: step {step} of this run was sampled already, and sampling never overwrites; "
            "delete that folder to draw again"
        )
    key_file = out / SAMPLE_KEY_FILE
    old_key = key_file.read_text().strip() if key_file.is_file() else None
    if old_key == sample_key:
        return "reused"
    why = f"drawn under sample key {old_key}, now {sample_key}" if old_key else f"no {SAMPLE_KEY_FILE}"
    _move_aside(out, why)
    return f"replaced: {why}"


def write_sample_key(run_dir: str | os.PathLike, step: int, sample_key: str | None) -> None:
    """Record the key the samples of ``step`` were drawn under (nothing for None)."""
    if sample_key is not None:
        with atomic_open(sample_path(run_dir, step) / SAMPLE_KEY_FILE) as handle:
            handle.write(f"{sample_key}\n")


def read_samples(run_dir: str | os.PathLike, step: int) -> ImageSet:
    """Load the samples drawn at ``step``, checking they come from that checkpoint.

    Raises
    ------
    FileNotFoundError
        The sampling step (03_sample) has not run for ``step``.
    ValueError
        The folder's provenance names another checkpoint.
    """
    from memstudy.data import ImageSet

    out = sample_path(run_dir, step)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no samples; run the sampling step (03_sample) for step {step} first")
    samples = ImageSet.load(out)
    drawn_at = samples.provenance.get("checkpoint_step")
    if drawn_at != step:
        raise ValueError(f"{out}: these samples were drawn at step {drawn_at}, not {step}")
    return samples


def check_training_set(run_dir: str | os.PathLike, training: ImageSet) -> None:
    """Check that ``training`` is the set the run trained on (its fingerprint in ``params.json``).

    Raises
    ------
    ValueError
        The fingerprints differ: the data, its options or ``n_subjects`` changed since training.
    """
    from memstudy.models.runs import PARAMS_FILE, dataset_fingerprint, read_params

    recorded = read_params(run_dir)["dataset"]["fingerprint"]
    now = dataset_fingerprint(training)
    if now != recorded:
        raise ValueError(
            f"{Path(run_dir) / PARAMS_FILE}: the training set loaded now (fingerprint {now}, "
            f"{len(training)} images) is not the one this run trained on (fingerprint {recorded}): the data "
            "changed since training; load it with the training step's dataset options, or train again"
        )


def report_arrays(reports: Mapping[str, MemorizationReport]) -> dict[str, np.ndarray]:
    """The :data:`MATCH_ARRAYS` of each report, keyed ``"<channel>/<name>"``."""
    arrays = {}
    for channel, report in reports.items():
        copy = np.zeros(report.max_r.size, dtype=bool)
        copy[report.likely_copies] = True
        values = {
            "values": report.match_values.astype(np.float32),
            "indices": report.match_indices.astype(np.int64),
            "max_r": report.max_r,
            "margin": report.margin,
            "transform": np.asarray(report.transform, dtype=str),
            "likely_copy": copy,
            "holdout_values": report.holdout_values.astype(np.float32),
            "holdout_indices": report.holdout_indices.astype(np.int64),
            "holdout_max_r": report.holdout_max_r,
            "holdout_margin": report.holdout_margin,
            "train_values": report.train_values.astype(np.float32),
            "train_indices": report.train_indices.astype(np.int64),
            "train_max_r": report.train_max_r,
            "threshold": np.float64(report.threshold),
            "margin_threshold": np.float64(report.margin_threshold),
        }
        arrays.update({f"{channel}/{name}": np.asarray(value) for name, value in values.items()})
    return arrays


def save_matches(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write arrays into one ``.npz`` file, atomically (no pickled objects).

    Raises
    ------
    ValueError
        No arrays, or an array of Python objects (it could not be read without pickle).
    """
    if not arrays:
        raise ValueError(f"{path}: no arrays to save")
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    objects = [name for name, value in arrays.items() if value.dtype == object]
    if objects:
        raise ValueError(f"{path}: arrays {objects} hold Python objects; give numbers, booleans or strings")
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def load_matches(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every array of a ``.npz`` written by :func:`save_matches`.

    Raises
    ------
    FileNotFoundError
        No such file: the memorization step (04_memorization) has not run for it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; run the memorization step (04_memorization) first")
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _json_safe(value: Any) -> Any:
    """``value`` with numpy scalars as Python ones and NaN or infinity as None (valid JSON)."""
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write summary rows as a JSON list, atomically; NaN and infinities become null."""
    write_json(path, [_json_safe(row) for row in rows])


def write_run_summary(run_dir: str | os.PathLike, steps: Iterable[int]) -> Path:
    """Merge ``reports/<step>.json`` of ``steps`` into ``summary.json``; return its path.

    The summary is ``{"run": <train.json>, "rows": [every row, steps ascending]}``.

    Raises
    ------
    FileNotFoundError
        Training has not finished, or a step's report is missing (named).
    ValueError
        No steps, or a report that is not a list of rows.
    """
    steps = sorted({_step(s) for s in steps})
    if not steps:
        raise ValueError(f"{run_dir}: no steps to summarize")
    run = read_train_record(run_dir)
    rows = []
    for step in steps:
        hint = f"run the memorization step (04_memorization) for step {step} first"
        rows += _read_json(report_path(run_dir, step), list, "a list of report rows", hint)
    path = summary_path(run_dir)
    write_json(path, {"run": run, "rows": rows})
    return path


def find_summaries(plan_dir: str | os.PathLike) -> list[Path]:
    """Every ``<plan_dir>/<dataset>/<model>/<run-id>/summary.json``, sorted; else the summaries of
    runs made by hand.

    A plan's folder has its summaries at run depth (the workflow's summary job writes them). Without
    any, every run folder below ``plan_dir`` (one with ``train.json``) that has memorization reports
    gets its ``summary.json`` written from them, so the step notebooks run one after another in one
    folder with their defaults (02 → 03 → 04 → 05) give a comparison too.

    Raises
    ------
    FileNotFoundError
        There is none.
    """
    plan_dir = Path(plan_dir)
    found = sorted(plan_dir.glob(f"*/*/*/{SUMMARY_FILE}"))
    if not found:
        for record in sorted(plan_dir.rglob(TRAIN_RECORD)):
            steps = sorted(
                int(p.stem) for p in (record.parent / "reports").glob("*.json") if p.stem.isdigit()
            )
            if steps:
                found.append(write_run_summary(record.parent, steps))
    if not found:
        raise FileNotFoundError(
            f"{plan_dir}: no run summaries (*/*/*/{SUMMARY_FILE}) and no run folder with memorization "
            "reports; run the study first (memstudy study) or pass summaries=[...]"
        )
    return found


def read_summaries(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """The rows of many runs' ``summary.json``, each with ``run_dir`` (the file's folder) added.

    Raises
    ------
    FileNotFoundError, ValueError
        A file is missing or is not a run summary (each named).
    """
    rows = []
    for path in map(Path, paths):
        hint = "the run's summary is written once all its memorization steps ran"
        summary = _read_json(path, dict, 'a run summary {"run": {...}, "rows": [...]}', hint)
        if not isinstance(summary.get("rows"), list):
            raise ValueError(f'{path}: not a run summary (expected {{"run": {{...}}, "rows": [...]}})')
        rows += [{**row, "run_dir": str(path.parent)} for row in summary["rows"]]
    return rows


def load_sample_values(table: pd.DataFrame) -> list[dict[str, np.ndarray]]:
    """Per row of a comparison table, the per-sample ``max_r`` and ``likely_copy`` behind it.

    The arrays come from ``matches/<step>.npz`` of the row's ``run_dir`` and ``channel``, in the table's
    row order: what :func:`memstudy.figures.memorization_curves` bootstraps.
    """
    loaded: dict[Path, dict[str, np.ndarray]] = {}
    values = []
    for row in table.itertuples(index=False):
        path = matches_path(row.run_dir, int(row.step))
        if path not in loaded:
            loaded[path] = load_matches(path)
        arrays = loaded[path]
        if f"{row.channel}/max_r" not in arrays:
            raise ValueError(f"{path}: no arrays for channel {row.channel!r}")
        values.append({name: arrays[f"{row.channel}/{name}"] for name in ("max_r", "likely_copy")})
    return values


def study_timing(plan_dir: str | os.PathLike) -> dict[str, Any]:
    """How long the executed notebooks under ``plan_dir`` took, from their papermill metadata.

    Returns
    -------
    dict
        ``n_notebooks`` (those with a recorded duration; failed partial notebooks, hidden files and runs
        moved aside are left out),
        ``notebook_seconds`` (the sum of their durations: jobs that ran side by side count each),
        ``span_seconds`` (from the earliest start to the latest end: the study's wall time when it ran
        in one go, longer when it was run in pieces), ``cpu_cores`` (of the machine reading them).
    """
    from datetime import datetime

    durations, starts, ends = [], [], []
    for path in sorted(Path(plan_dir).rglob("*.ipynb")):
        parts = path.relative_to(plan_dir).parts
        # Partial notebooks of failed jobs, ones being written (hidden temporary files) and those of runs
        # moved aside for another run key are not part of the study.
        if path.name.endswith(".failed.ipynb") or any(
            p.startswith(".") or p.endswith(".replaced") for p in parts
        ):
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))["metadata"]["papermill"]
            duration = float(record["duration"])
            start, end = (datetime.fromisoformat(record[key]) for key in ("start_time", "end_time"))
        except (OSError, ValueError, KeyError, TypeError):  # not executed by papermill, or still running
            continue
        durations.append(duration)
        starts.append(start)
        ends.append(end)
    span = (max(ends) - min(starts)).total_seconds() if durations else 0.0
    return {
        "n_notebooks": len(durations),
        "notebook_seconds": float(sum(durations)),
        "span_seconds": span,
        "cpu_cores": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m memstudy.workflow.runfolder RUN_DIR STEP...``: write the run's ``summary.json``
    (the workflow's summary job)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m memstudy.workflow.runfolder")
    parser.add_argument("run_dir")
    parser.add_argument("steps", type=int, nargs="+")
    args = parser.parse_args(argv)
    write_run_summary(args.run_dir, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
