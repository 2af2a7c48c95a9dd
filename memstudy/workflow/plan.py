"""A study plan (YAML) and its expansion into runs and notebook jobs.

A *run* is one dataset × model × training-set size (subjects) × seed. A plan lists the datasets with
their loader options and training-set sizes, the models with their training settings, the seeds, and
the settings of sampling and memorization. Every run gets one training job, and one sampling and one
memorization job per kept checkpoint; every dataset a data job; the plan one comparison job. Paths are
relative to the plan's folder ``runs/<plan>/``::

    <dataset>/01_data.ipynb
    <dataset>/<model>/n<subjects>-s<seed>/   02_train.ipynb, train.json, checkpoints/, samples/<step>/,
                                              03_sample-<step>.ipynb, matches/<step>.npz,
                                              reports/<step>.json, 04_memorization-<step>.ipynb,
                                              summary.json
    comparison.csv, 05_compare.ipynb

The Snakefile, ``memstudy study`` and the book all read plans through this module.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: The steps, in order, and their notebooks.
NOTEBOOKS = {
    "data": "01_data.ipynb",
    "train": "02_train.ipynb",
    "sample": "03_sample.ipynb",
    "memorization": "04_memorization.ipynb",
    "compare": "05_compare.ipynb",
}
MODELS = ("ddpm", "stylegan")
#: Settings each section of a plan accepts, with their defaults (None: required).
DATASET_KEYS = {
    "root": None,
    "options": {},
    "train_split": "train",
    "holdout_split": "holdout",
    "train_subjects": None,
    "channels": [None],
}
MODEL_KEYS = {"config": "tiny", "overrides": {}, "steps": None, "checkpoints": None, "sampling": {}}
SAMPLING_KEYS = {"n_samples": 32, "sampler": None, "sample_steps": None, "seed": 0}
MEMORIZATION_KEYS = {
    "k": 5,
    "quantile": 0.99,
    "mirror": False,
    "max_shift": 0,
    "dedup_threshold": None,
    "show_training_images": True,
    "max_browser_images": 100,
}
RESOURCE_KEYS = {"threads", "mem_mb", "runtime", "gpu"}
DEFAULT_RESOURCES = {"threads": 1, "mem_mb": 4000, "runtime": 60, "gpu": 0}
PLAN_KEYS = {"name", "seeds", "device", "datasets", "models", "memorization", "resources"}


@dataclass(frozen=True)
class Run:
    """One training run: dataset × model × training-set size × seed."""

    dataset: str
    model: str
    n_subjects: int
    seed: int

    @property
    def run_id(self) -> str:
        return f"n{self.n_subjects}-s{self.seed}"

    @property
    def folder(self) -> str:
        """The run's folder, relative to the plan's folder."""
        return f"{self.dataset}/{self.model}/{self.run_id}"


@dataclass(frozen=True)
class Job:
    """One notebook execution: its step, parameters, executed notebook and what it belongs to."""

    step: str
    notebook: str  # relative to the plan's folder
    parameters: dict[str, Any]
    title: str
    dataset: str | None = None
    run: Run | None = None
    checkpoint: int | None = None

    @property
    def template(self) -> str:
        return NOTEBOOKS[self.step]


@dataclass(frozen=True)
class Plan:
    """A validated plan; :meth:`jobs` expands it."""

    name: str
    path: Path
    seeds: tuple[int, ...]
    device: str
    datasets: dict[str, dict[str, Any]]
    models: dict[str, dict[str, Any]]
    memorization: dict[str, Any]
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def runs(self, only: Mapping[str, str] | None = None) -> list[Run]:
        """Every run of the plan (or those matching ``only``, e.g. ``{"model": "ddpm"}``)."""
        runs = [
            Run(dataset, model, n, seed)
            for dataset, d in self.datasets.items()
            for model in self.models
            for n in d["train_subjects"]
            for seed in self.seeds
        ]
        return [run for run in runs if _matches(run, only)]

    def resources_of(self, step: str) -> dict[str, Any]:
        """Threads, memory (MB), runtime (minutes) and GPUs a step's jobs declare."""
        return {**DEFAULT_RESOURCES, **self.resources.get(step, {})}

    def jobs(self, only: Mapping[str, str] | None = None) -> list[Job]:
        """The notebook jobs, in the order a reader meets them: data, then per run train, sample and
        memorization per checkpoint, then the comparison (omitted when ``only`` selects runs)."""
        jobs = []
        runs = self.runs(only)
        for dataset in dict.fromkeys(run.dataset for run in runs) if only else self.datasets:
            jobs.append(self._data_job(dataset))
        for run in runs:
            jobs.append(self._train_job(run))
            for step in self.models[run.model]["checkpoints"]:
                jobs.append(self._sample_job(run, step))
                jobs.append(self._memorization_job(run, step))
        if not only:
            jobs.append(self._compare_job(runs))
        return jobs

    def _data_job(self, dataset: str) -> Job:
        d = self.datasets[dataset]
        size = d["options"].get("size")
        # The data page shows every subject the study draws from: training pool and held-out ones.
        options = {key: value for key, value in d["options"].items() if key != "holdout"}
        parameters = {"dataset": dataset, "root": d["root"], "data_options": options}
        parameters |= {"n_subjects": None, "seed": 0}
        title = f"Data: {dataset}" + (f" ({size} px)" if size else "")
        return Job("data", f"{dataset}/01_data.ipynb", parameters, title, dataset=dataset)

    def _data_parameters(self, run: Run) -> dict[str, Any]:
        d = self.datasets[run.dataset]
        return {
            "dataset": run.dataset,
            "root": d["root"],
            "data_options": copy.deepcopy(d["options"]),
            "train_split": d["train_split"],
            "n_subjects": run.n_subjects,
        }

    def _train_job(self, run: Run) -> Job:
        m = self.models[run.model]
        parameters = {
            **self._data_parameters(run),
            "model": run.model,
            "config": m["config"],
            "overrides": copy.deepcopy(m["overrides"]),
            "steps": m["steps"],
            "checkpoints": list(m["checkpoints"]),
            "seed": run.seed,
            "device": self.device,
            "run_dir": run.folder,
        }
        title = (
            f"Train: {model_name(run.model)} on {run.dataset}, {_subjects(run.n_subjects)} (seed {run.seed})"
        )
        return Job("train", f"{run.folder}/02_train.ipynb", parameters, title, run.dataset, run)

    def _sample_job(self, run: Run, step: int) -> Job:
        sampling = self.models[run.model]["sampling"]
        parameters = {"run_dir": run.folder, "step": step, **sampling, "device": self.device}
        title = f"Samples: {model_name(run.model)} on {run.dataset}, {_subjects(run.n_subjects)}, step {step}"
        return Job(
            "sample", f"{run.folder}/03_sample-{step}.ipynb", parameters, title, run.dataset, run, step
        )

    def _memorization_job(self, run: Run, step: int) -> Job:
        d = self.datasets[run.dataset]
        data = self._data_parameters(run)
        parameters = {
            "run_dir": run.folder,
            "step": step,
            **data,
            "holdout_split": d["holdout_split"],
            "channels": list(d["channels"]),
            **self.memorization,
        }
        what = f"{model_name(run.model)} on {run.dataset}, {_subjects(run.n_subjects)}"
        title = f"Memorization: {what}, step {step}"
        return Job(
            "memorization",
            f"{run.folder}/04_memorization-{step}.ipynb",
            parameters,
            title,
            run.dataset,
            run,
            step,
        )

    def _compare_job(self, runs: list[Run]) -> Job:
        summaries = [f"{run.folder}/summary.json" for run in runs]
        parameters = {"plan_dir": ".", "summaries": summaries, "out": "comparison.csv"}
        return Job("compare", "05_compare.ipynb", parameters, "Comparison of all runs")


def model_name(model: str) -> str:
    """How pages name a model (DDPM, StyleGAN2)."""
    return {"ddpm": "DDPM", "stylegan": "StyleGAN2"}.get(model, model)


def _subjects(n: int) -> str:
    return f"{n} subject" + ("" if n == 1 else "s")


def _matches(run: Run, only: Mapping[str, str] | None) -> bool:
    if not only:
        return True
    values = {
        "dataset": run.dataset,
        "model": run.model,
        "n_subjects": str(run.n_subjects),
        "seed": str(run.seed),
    }
    return all(values[key] == str(value) for key, value in only.items())


def parse_only(text: str | None) -> dict[str, str]:
    """Parse ``--only dataset=cxr-phantom,model=ddpm`` (keys: dataset, model, n_subjects, seed)."""
    if not text:
        return {}
    only = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("dataset", "model", "n_subjects", "seed") or not value.strip():
            raise ValueError(
                f"--only {text!r}: expected KEY=VALUE[,KEY=VALUE...] "
                "with keys dataset, model, n_subjects, seed"
            )
        only[key] = value.strip()
    return only


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and check a plan file.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Invalid YAML, or a setting that is unknown, missing or of the wrong kind (named with the file).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such plan file") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    where = str(path)
    raw = _mapping(raw, where, PLAN_KEYS, required={"datasets", "models"})
    seeds = raw.get("seeds", [0])
    if not _is_list_of(seeds, int) or not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"{where}: seeds must be a non-empty list of non-negative integers, got {seeds!r}")
    datasets = {
        name: _dataset(entry, f"{where}: datasets.{name}")
        for name, entry in _mapping(raw["datasets"], f"{where}: datasets").items()
    }
    models = {
        name: _model(name, entry, f"{where}: models.{name}")
        for name, entry in _mapping(raw["models"], f"{where}: models").items()
    }
    if not datasets or not models:
        raise ValueError(f"{where}: a plan needs at least one dataset and one model")
    memorization = {
        **MEMORIZATION_KEYS,
        **_mapping(raw.get("memorization", {}), f"{where}: memorization", set(MEMORIZATION_KEYS)),
    }
    resources = {}
    for step, entry in _mapping(raw.get("resources", {}), f"{where}: resources", set(NOTEBOOKS)).items():
        entry = _mapping(entry, f"{where}: resources.{step}", RESOURCE_KEYS)
        for key, value in entry.items():
            if not isinstance(value, int) or value < (1 if key in ("threads", "mem_mb", "runtime") else 0):
                raise ValueError(f"{where}: resources.{step}.{key} must be a positive integer, got {value!r}")
        resources[step] = entry
    device = raw.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{where}: device must be auto, cpu or cuda, got {device!r}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"{where}: name must be a plain folder name, got {name!r}")
    return Plan(name, path, tuple(seeds), device, datasets, models, memorization, resources)


def _dataset(entry: Any, where: str) -> dict[str, Any]:
    from memstudy.data.datasets import DATASETS

    name = where.rsplit(".", 1)[-1]
    if name not in DATASETS:
        raise ValueError(f"{where}: unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    d = {
        **copy.deepcopy(DATASET_KEYS),
        **_mapping(entry, where, set(DATASET_KEYS), required={"train_subjects"}),
    }
    sizes = d["train_subjects"]
    if not _is_list_of(sizes, int) or not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise ValueError(
            f"{where}.train_subjects must be a list of distinct positive integers, got {sizes!r}"
        )
    if not isinstance(d["options"], dict):
        raise ValueError(f"{where}.options must be a mapping of loader options, got {d['options']!r}")
    if not isinstance(d["channels"], list) or not d["channels"]:
        raise ValueError(f"{where}.channels must be a list of channel names or null (all together)")
    return d


def _model(name: str, entry: Any, where: str) -> dict[str, Any]:
    if name not in MODELS:
        raise ValueError(f"{where}: unknown model {name!r}; expected one of {', '.join(MODELS)}")
    m = {
        **copy.deepcopy(MODEL_KEYS),
        **_mapping(entry, where, set(MODEL_KEYS), required={"steps", "checkpoints"}),
    }
    steps, checkpoints = m["steps"], m["checkpoints"]
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}.steps must be a positive integer, got {steps!r}")
    if not _is_list_of(checkpoints, int) or not checkpoints or not all(1 <= c <= steps for c in checkpoints):
        raise ValueError(
            f"{where}.checkpoints must be a non-empty list of steps in 1..{steps}, got {checkpoints!r}"
        )
    m["checkpoints"] = sorted(set(checkpoints))
    if not isinstance(m["overrides"], dict):
        raise ValueError(f"{where}.overrides must be a mapping of config fields, got {m['overrides']!r}")
    m["sampling"] = {**SAMPLING_KEYS, **_mapping(m["sampling"], f"{where}.sampling", set(SAMPLING_KEYS))}
    return m


def _mapping(value: Any, where: str, allowed: set[str] | None = None, required: Iterable[str] = ()) -> dict:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
    if allowed is not None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown settings {unknown}; expected some of {sorted(allowed)}")
    missing = [key for key in required if key not in value]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    return dict(value)


def _is_list_of(value: Any, kind: type) -> bool:
    return isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
