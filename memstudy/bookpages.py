"""The book's pages written from a plan: a results page per dataset × model, and the discussion with
the plan's comparison against the paper.

Their numbers are not typed: every value is a MyST-NB ``{glue:text}`` reference to a staged, executed
notebook (the memorization notebooks glue each run's fractions, the comparison notebook the per-model
statements and the paper's findings), so the page says what that build measured. A reference is only
written for a notebook that is staged, so a failed job leaves a row out instead of breaking the build.
:func:`memstudy.book.stage_plan` calls :func:`write_results_pages` and :func:`write_discussion`.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from memstudy.atomic import atomic_open

if TYPE_CHECKING:
    from memstudy.workflow.plan import Job

#: Where the hand-written discussion (relative to the book's source) has the plan's comparison with the
#: paper put in; an HTML comment, so the unstaged page shows nothing there.
PAPER_MARKER = "<!-- memstudy: against the paper -->"
DISCUSSION_SOURCE = Path("book", "discussion.md")
#: The columns of a results page's table: heading and the memorization notebook's glue key and format.
RESULT_COLUMNS = (
    ("samples", "n_samples", "d"),
    ("median best r", "median_max_r", ".3f"),
    ("held-out median best r", "holdout_median_max_r", ".3f"),
    ("above held-out p99", "frac_above_holdout_p99", ".0%"),
    ("likely copies", "frac_likely_copies", ".0%"),
    ("Mann–Whitney p", "mann_whitney_p", ".2g"),
)


def _glue(notebook: str, key: str, fmt: str, page: str) -> str:
    """A ``{glue:text}`` role pasting ``key`` of ``notebook`` into ``page`` (both relative to the plan's
    staged folder). The format is always given: without one, MyST-NB reads ``path::key`` as
    ``path:`` and format ``key``."""
    relative = os.path.relpath(notebook, PurePosixPath(page).parent)
    return f"{{glue:text}}`{PurePosixPath(relative)}::{key}:{fmt}`"


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` atomically, leaving an unchanged page alone (Sphinx then keeps its cached build)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    with atomic_open(path, "w") as handle:
        handle.write(text)


def staged_compare(jobs: list[Job], staged: set[str]) -> str | None:
    """The plan's comparison notebook, when it is staged (relative to the plan's staged folder)."""
    return next((job.notebook for job in jobs if job.step == "compare" and job.notebook in staged), None)


def results_page(dataset: str, model: str, jobs: list[Job], staged: set[str], compare: str | None) -> str:
    """The results page of one dataset × model, as MyST markdown.

    Parameters
    ----------
    dataset, model : str
        The part's dataset and model.
    jobs : list of memstudy.workflow.plan.Job
        The plan's memorization jobs of this dataset and model, in plan order.
    staged : set of str
        The staged notebooks (``Job.notebook``); only those get a row.
    compare : str, optional
        The staged comparison notebook (relative to the plan's staged folder), for the size statement.
    """
    from memstudy.workflow.plan import model_name

    page = f"{dataset}/{model}/results.md"
    title = f"{dataset} × {model_name(model)}"
    rows = [job for job in jobs if job.notebook in staged]
    sizes = sorted({job.run.n_subjects for job in rows})
    steps = sorted({job.checkpoint for job in rows})
    lines = [
        f"# Results: {title}",
        "",
        f"{model_name(model)} trained on {dataset} with "
        + " and ".join(str(n) for n in sizes)
        + f" training subject{'s' * (sizes != [1])}, measured at step{'s' * (len(steps) > 1)} "
        + " and ".join(str(s) for s in steps)
        + ". Every number below is pasted from the run's memorization notebook, for its first reported "
        "channel; the run's own pages follow, with the nearest-match browser of every checkpoint.",
        "",
        "```{container} memstudy-results",  # book/_vendor/memstudy.css sets its type size
        "| training subjects | seed | step | " + " | ".join(h for h, _, _ in RESULT_COLUMNS) + " |",
        "|" + "---:|" * (3 + len(RESULT_COLUMNS)),
    ]
    for job in rows:
        cells = [str(job.run.n_subjects), str(job.run.seed), str(job.checkpoint)]
        cells += [_glue(job.notebook, key, fmt, page) for _, key, fmt in RESULT_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "```",
        "",
        "*Likely copies* are samples whose best r exceeds the held-out threshold and whose margin over "
        "the best match in another subject exceeds the held-out margin (see Methods); *above held-out "
        "p99* counts the best r alone.",
    ]
    if compare is not None:
        statement = _glue(compare, f"sizes_{dataset}_{model}", "s", page)
        lines += ["", f"By training-set size, each run at its last checkpoint: {statement}"]
    return "\n".join(lines) + "\n"


def write_results_pages(staged_dir: Path, jobs: list[Job], staged: set[str]) -> dict[tuple[str, str], str]:
    """Write ``<dataset>/<model>/results.md`` under ``staged_dir`` for every dataset × model with a staged
    memorization notebook; return their paths relative to ``staged_dir``, without suffix, by
    ``(dataset, model)``."""
    compare = staged_compare(jobs, staged)
    parts: dict[tuple[str, str], list[Job]] = {}
    for job in jobs:
        if job.step == "memorization" and job.run is not None:
            parts.setdefault((job.run.dataset, job.run.model), []).append(job)
    written = {}
    for (dataset, model), part_jobs in parts.items():
        if not any(job.notebook in staged for job in part_jobs):
            continue
        _write_if_changed(
            staged_dir / dataset / model / "results.md",
            results_page(dataset, model, part_jobs, staged, compare),
        )
        written[dataset, model] = f"{dataset}/{model}/results"
    return written


def paper_section(compare: str, page: str) -> str:
    """The discussion's section on the paper's findings, pasting the comparison notebook's verdicts."""
    findings = (
        ("models", "DDPM against StyleGAN2 on the same training set"),
        ("sizes", "smaller against larger training sets"),
        ("volumes", "slices of volumes against independent images"),
    )
    lines = [
        "## Where this build agrees with the paper, and where it does not",
        "",
        "The paper found that diffusion models copy more than GANs, small training sets more than large "
        "ones, and slices of 3D volumes more than independent images. This build's runs, each at its "
        "last checkpoint (the comparison page explains the verdicts):",
        "",
    ]
    for name, what in findings:
        verdict = _glue(compare, f"paper_{name}_verdict", "s", page)
        measured = _glue(compare, f"paper_{name}_measured", "s", page)
        lines.append(f"- {what}: **{verdict}** ({measured}).")
    lines += [
        "",
        "A verdict of *no difference* or *differs* is a result of this build, not an error to explain "
        "away: tiny models trained for minutes on phantoms may not copy at all, or copy in ways the paper's "
        "models did not. The limits below say which differences the measurement itself can cause.",
    ]
    return "\n".join(lines)


def write_discussion(source: Path, staged_dir: Path, jobs: list[Job], staged: set[str]) -> str | None:
    """Write the plan's discussion (the hand-written one with :func:`paper_section` at
    :data:`PAPER_MARKER`) under ``staged_dir``; return its path relative to ``staged_dir`` without suffix,
    or ``None`` when the comparison notebook is not staged (the book then lists the hand-written page).

    Raises
    ------
    ValueError
        When the hand-written discussion lacks :data:`PAPER_MARKER`.
    """
    compare = staged_compare(jobs, staged)
    if compare is None:
        return None
    path = source / DISCUSSION_SOURCE
    text = path.read_text(encoding="utf-8")
    if PAPER_MARKER not in text:
        raise ValueError(
            f"{path}: expected the line {PAPER_MARKER!r} where the comparison with the paper goes"
        )
    _write_if_changed(
        staged_dir / "discussion.md", text.replace(PAPER_MARKER, paper_section(compare, "discussion.md"))
    )
    return "discussion"
