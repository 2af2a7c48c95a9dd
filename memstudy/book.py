"""Build the memstudy Jupyter Book so that it renders offline.

The book is Jupyter Book 1.x over notebooks already executed by papermill. Three things make it work
without a network or a kernel (see ``book/_vendor/README.md`` and ``_config.yml``):

* plotly figures are stored as ``text/html`` that calls a site-wide, vendored ``plotly.min.js``
  (:func:`memstudy.figures.use_offline_plotly_renderer`);
* ipywidgets render from the widget state saved in each notebook, through the vendored
  ``@jupyter-widgets/html-manager`` bundle instead of require.js and a CDN;
* MathJax is vendored too.

:func:`check_offline` verifies the result, and :func:`build_book` refuses a book that fails it.

The pages come from a plan's executed notebooks (``runs/<plan>/``, written by ``memstudy study``):
:func:`stage_plan` copies them into ``book/notebooks/<plan>/`` with their presentation fixed (the job's
title as heading, the run's parameters as a table instead of code) and writes the table of contents
``book/notebooks/<plan>/_toc.yml`` from the plan, listing only the notebooks that exist.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import yaml

from memstudy.atomic import atomic_open, write_json
from memstudy.bookpages import write_discussion, write_results_pages

if TYPE_CHECKING:
    from memstudy.workflow.plan import Job, Run

logger = logging.getLogger(__name__)

#: Where :func:`stage_plan` puts a plan's notebooks and table of contents, under the book's source.
STAGED_DIR = Path("book", "notebooks")
#: The hand-written chapters (paths relative to the source folder, without suffix): the root page,
#: the chapters before the plan's pages and those after them.
INTRO = "book/intro"
STUDY_CHAPTERS = ("book/methods",)
DISCUSSION_CHAPTERS = ("book/discussion",)
USE_CHAPTERS = ("book/rerun", "book/teaching", "book/references")
#: The live explorer's notebook (in ``memstudy/notebooks/``): staged as committed, without outputs (the
#: book has no kernel; its first cell is a static fallback saying how to run it), and listed after the
#: chapter whose exercises use it.
EXPLORER_NOTEBOOK = "explore.ipynb"
EXPLORER_AFTER = "book/teaching"
#: Tag of the markdown cell that shows a run's parameters in a staged notebook.
PARAMETER_TABLE_TAG = "memstudy-parameters"

# Hosts whose appearance in inline JavaScript means a script would be fetched at run time.
_CDN_HOSTS = (
    "cdn.jsdelivr.net",
    "unpkg.com",
    "cdnjs.cloudflare.com",
    "cdn.plot.ly",
    "cdn.mathjax.org",
    "ajax.googleapis.com",
    "code.jquery.com",
    "fonts.googleapis.com",
    "fonts.gstatic.com",
    "requirejs.org",
)
# <link rel=...> values that make the browser fetch the target.
_FETCHED_LINK_RELS = {
    "stylesheet",
    "preload",
    "modulepreload",
    "prefetch",
    "preconnect",
    "dns-prefetch",
    "icon",
    "apple-touch-icon",
    "manifest",
}
_FETCHED_SRC_TAGS = {"script", "img", "iframe", "embed", "source", "video", "audio", "track"}
_JS_TYPES = {"", "text/javascript", "application/javascript", "module"}
_URL_IN_JS = re.compile(r"""["'`]((?:https?:)?//[^"'`\s]+)["'`]""")
_CSS_REMOTE = re.compile(r"""(@import\s+(?:url\(\s*)?["']?|url\(\s*["']?)((?:https?:)?//[^"')\s]+)""", re.I)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class BookBuildError(RuntimeError):
    """The Jupyter Book build failed or produced pages that need a network."""


@dataclass(frozen=True)
class StagedBook:
    """What :func:`stage_plan` put into the book's source.

    Attributes
    ----------
    toc : Path
        The generated table of contents (absolute path), for :func:`build_book`.
    pages : list of str
        The staged notebooks, as paths relative to the plan's folder, in the plan's order.
    missing : list of str
        The plan's notebooks that are not in the book: never executed, or failed (only the partial
        ``<name>.failed.ipynb`` exists, or papermill recorded an exception); relative to the plan's
        folder.
    """

    toc: Path
    pages: list[str]
    missing: list[str]


def stage_plan(
    plan: str | os.PathLike,
    *,
    runs_dir: str | os.PathLike = "runs",
    source: str | os.PathLike = ".",
) -> StagedBook:
    """Copy a plan's executed notebooks into the book's source and write its table of contents.

    Each notebook ``runs_dir/<plan name>/<job notebook>`` that exists and did not fail is copied to
    ``source/book/notebooks/<plan name>/<job notebook>`` as :func:`present_notebook` shows it. A copy is
    rewritten only when its notebook, its title or this module changed (a digest of each is kept in
    ``.staged.json`` there); staged notebooks the plan no longer has, or whose notebook disappeared,
    are removed. The table of contents, ``book/notebooks/<plan name>/_toc.yml``, is: the introduction;
    *The study* (methods); *Data*, one page per dataset; one part per dataset × model, opening with its
    results page (:func:`memstudy.bookpages.write_results_pages`), then a chapter per run (its training
    page, with the sampling and memorization pages of each checkpoint as sections); *Comparison*;
    *Discussion* (the plan's, with the paper's findings: :func:`memstudy.bookpages.write_discussion`);
    *Use it* (re-running, teaching, the live explorer, references). The live explorer's
    notebook (:data:`EXPLORER_NOTEBOOK`) is copied there as committed, un-executed. Only staged
    notebooks are listed; the missing ones are named in one warning.

    Parameters
    ----------
    plan : path
        The plan file (YAML, read by :func:`memstudy.workflow.plan.load_plan`).
    runs_dir : path
        Folder holding the plan's folder, as given to ``memstudy study --runs-dir``.
    source : path
        The book's source folder (with ``_config.yml``).

    Returns
    -------
    StagedBook
        The table of contents' path, the staged and the missing notebooks.

    Raises
    ------
    FileNotFoundError
        If ``source`` has no ``_config.yml``, or no notebook of the plan was executed (or all failed):
        run ``memstudy study --plan PLAN`` first.
    ValueError
        If the plan is invalid, or a notebook is not a readable notebook (named with its path).
    """
    import nbformat

    from memstudy.workflow.execute import NOTEBOOKS_DIR, failed_path
    from memstudy.workflow.plan import load_plan

    source = Path(source).resolve()
    _require_file(source / "_config.yml", source)
    study = load_plan(plan)
    plan_dir = Path(runs_dir) / study.name
    jobs = study.jobs()
    staged_dir = source / STAGED_DIR / study.name
    manifest_path = staged_dir / ".staged.json"
    try:
        previous = json.loads(manifest_path.read_text())
        previous = previous if isinstance(previous, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: stage everything again
        previous = {}
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

    digests: dict[str, str] = {}
    failed: set[str] = set()
    for job in jobs:
        executed = plan_dir / job.notebook
        if not executed.is_file():
            if failed_path(executed).is_file():
                failed.add(job.notebook)
            continue
        content = executed.read_bytes()
        digest = hashlib.sha256(f"{code}\n{job.title}\n".encode() + content).hexdigest()
        target = staged_dir / job.notebook
        if previous.get(job.notebook) == digest and target.is_file():
            digests[job.notebook] = digest
            continue
        notebook = _read_notebook(content, executed)
        if notebook.metadata.get("papermill", {}).get("exception"):
            failed.add(job.notebook)
            continue
        present_notebook(notebook, job.title, where=executed)
        with atomic_open(target, "w") as handle:
            nbformat.write(notebook, handle)
        digests[job.notebook] = digest

    if not digests:
        runs_option = "" if Path(runs_dir) == Path("runs") else f" --runs-dir {runs_dir}"
        raise FileNotFoundError(
            f"{plan_dir}: no executed notebook of plan {study.name!r} that did not fail (expected "
            f"{len(jobs)}, e.g. "
            f"{plan_dir / jobs[0].notebook}); run `memstudy study --plan {plan}{runs_option}` first"
        )
    explorer = staged_dir / EXPLORER_NOTEBOOK
    content = (NOTEBOOKS_DIR / EXPLORER_NOTEBOOK).read_bytes()
    if not explorer.is_file() or explorer.read_bytes() != content:
        with atomic_open(explorer, "wb") as handle:
            handle.write(content)
    results = write_results_pages(staged_dir, jobs, set(digests))
    discussion = write_discussion(source, staged_dir, jobs, set(digests))
    generated = [f"{name}.md" for name in [*results.values(), *([discussion] if discussion else [])]]
    _remove_stale(staged_dir, {staged_dir / name for name in [*digests, *generated]} | {explorer})
    write_json(manifest_path, digests)

    pages = [job.notebook for job in jobs if job.notebook in digests]
    missing = [job.notebook for job in jobs if job.notebook not in digests]
    if missing:
        named = [name + (" (failed)" if name in failed else "") for name in missing]
        logger.warning(
            "%d of %d notebooks of plan %s are missing from the book (not run or failed) in %s: %s",
            len(missing),
            len(jobs),
            study.name,
            plan_dir,
            ", ".join(named),
        )
    toc_path = staged_dir / "_toc.yml"
    prefix = (STAGED_DIR / study.name).as_posix()
    toc = book_toc(
        jobs,
        set(pages),
        prefix,
        explorer=f"{prefix}/{Path(EXPLORER_NOTEBOOK).stem}",
        results={part: f"{prefix}/{page}" for part, page in results.items()},
        discussion=f"{prefix}/{discussion}" if discussion else None,
    )
    with atomic_open(toc_path, "w") as handle:
        handle.write(f"# Generated by `memstudy book` from {plan}; changes here are overwritten.\n")
        yaml.safe_dump(toc, handle, sort_keys=False, allow_unicode=True)
    logger.info("staged %d notebooks of plan %s into %s", len(pages), study.name, staged_dir)
    return StagedBook(toc_path, pages, missing)


def book_toc(
    jobs: list[Job],
    staged: set[str],
    prefix: str,
    *,
    explorer: str | None = None,
    results: dict[tuple[str, str], str] | None = None,
    discussion: str | None = None,
) -> dict[str, Any]:
    """Return the Jupyter Book table of contents for a plan's jobs, listing the staged ones.

    Parameters
    ----------
    jobs : list of memstudy.workflow.plan.Job
        The plan's jobs, in the plan's order.
    staged : set of str
        ``Job.notebook`` of the jobs whose notebook is in the book.
    prefix : str
        Folder of the staged notebooks, relative to the book's source (``book/notebooks/<plan>``).
    explorer : str, optional
        The live explorer's page (``<prefix>/explore``), listed right after :data:`EXPLORER_AFTER`.
    results : dict, optional
        Each dataset × model's results page by ``(dataset, model)`` (from
        :func:`memstudy.bookpages.write_results_pages`), listed first in its part.
    discussion : str, optional
        The plan's discussion page (:func:`memstudy.bookpages.write_discussion`), listed instead of
        :data:`DISCUSSION_CHAPTERS`.

    Returns
    -------
    dict
        A ``jb-book`` table of contents (see :func:`stage_plan` for its parts); parts without a page
        are left out.
    """
    from memstudy.workflow.plan import model_name

    def page(job: Job) -> dict[str, Any]:
        return {"file": f"{prefix}/{job.notebook.removesuffix('.ipynb')}"}

    present = [job for job in jobs if job.notebook in staged]
    runs: dict[Run, list[Job]] = {}  # run → its jobs, in plan order
    for job in present:
        if job.run is not None:
            runs.setdefault(job.run, []).append(job)
    parts: dict[str, list[dict[str, Any]]] = {}  # caption → chapters, dataset × model in plan order
    for run, run_jobs in runs.items():
        caption = f"{run.dataset} × {model_name(run.model)}"
        if caption not in parts and (run.dataset, run.model) in (results or {}):
            parts[caption] = [{"file": results[run.dataset, run.model]}]
        first, rest = run_jobs[0], run_jobs[1:]
        if first.step == "train":
            chapters = [{**page(first), "sections": [page(job) for job in rest]} if rest else page(first)]
        else:  # training page missing: the run's other pages stand alone rather than under another one
            chapters = [page(job) for job in run_jobs]
        parts.setdefault(caption, []).extend(chapters)

    def part(caption: str, chapters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"caption": caption, "chapters": chapters}] if chapters else []

    use = [{"file": name} for name in USE_CHAPTERS]
    if explorer is not None:
        use.insert(USE_CHAPTERS.index(EXPLORER_AFTER) + 1, {"file": explorer})

    return {
        "format": "jb-book",
        "root": INTRO,
        "parts": [
            *part("The study", [{"file": name} for name in STUDY_CHAPTERS]),
            *part("Data", [page(job) for job in present if job.step == "data"]),
            *[entry for caption, chapters in parts.items() for entry in part(caption, chapters)],
            # Plan-wide pages (the comparison): the jobs of no run, other than the data pages.
            *part("Comparison", [page(job) for job in present if job.run is None and job.step != "data"]),
            *part(
                "Discussion",
                [{"file": name} for name in ([discussion] if discussion else DISCUSSION_CHAPTERS)],
            ),
            *part("Use it", use),
        ],
    }


def present_notebook(notebook: Any, title: str, *, where: str | os.PathLike = "notebook") -> None:
    """Prepare an executed notebook for the book, in place.

    * The first ``# `` heading becomes ``# <title>`` (a heading cell is added when there is none), so
      pages of the same notebook with different parameters have different titles.
    * When papermill injected parameters (the cell tagged ``injected-parameters``), a markdown table of
      them (tagged ``memstudy-parameters``) takes that cell's place, and both the injected cell and the
      notebook's own ``parameters`` cell (its defaults) are tagged ``remove-cell``. The table lists each
      injected name with its value as a Python literal (``repr``; dicts and lists inline), then each
      default the run did not override, marked "(notebook default)".

    Parameters
    ----------
    notebook : nbformat.NotebookNode
        An executed notebook (nbformat 4).
    title : str
        The page's title.
    where : str or path
        Names the notebook in error messages.

    Raises
    ------
    ValueError
        If a parameters cell is not valid Python.
    """
    import nbformat

    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            lines = cell.source.split("\n")
            heading = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
            if heading is not None:
                lines[heading] = f"# {title}"
                cell.source = "\n".join(lines)
                break
    else:
        notebook.cells.insert(0, nbformat.v4.new_markdown_cell(f"# {title}"))

    def tagged(tag: str) -> list[int]:
        return [i for i, cell in enumerate(notebook.cells) if tag in cell.get("metadata", {}).get("tags", [])]

    injected = tagged("injected-parameters")
    if not injected:
        return  # the defaults ran, and the parameters cell shows them
    values: dict[str, str] = {}
    for index in injected:
        values.update(_assignments(notebook.cells[index].source, f"{where}: cell {index}"))
    defaults = {}
    for index in tagged("parameters"):
        defaults.update(_assignments(notebook.cells[index].source, f"{where}: cell {index}"))
    rows = [f"| `{name}` | {_code(value)} |" for name, value in values.items()]
    rows += [
        f"| `{name}` | {_code(value)} (notebook default) |"
        for name, value in defaults.items()
        if name not in values
    ]
    table = nbformat.v4.new_markdown_cell(
        "**Parameters of this run**\n\n| parameter | value |\n| --- | --- |\n" + "\n".join(rows)
    )
    table.metadata["tags"] = [PARAMETER_TABLE_TAG]
    for index in injected + tagged("parameters"):
        tags = notebook.cells[index].metadata.setdefault("tags", [])
        if "remove-cell" not in tags:
            tags.append("remove-cell")
    notebook.cells.insert(injected[-1] + 1, table)


def _assignments(code: str, where: str) -> dict[str, str]:
    """The ``name = value`` statements of a parameters cell: name → value as a short Python literal."""
    try:
        tree = ast.parse(code)
    except SyntaxError as error:
        raise ValueError(
            f"{where}: the parameters cell is not valid Python ({error.msg}, line {error.lineno})"
        ) from None
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target = node.target
        else:
            continue
        if not isinstance(target, ast.Name):
            continue
        try:
            found[target.id] = repr(ast.literal_eval(node.value))
        except (ValueError, TypeError, SyntaxError):  # an expression, not a literal: shown as written
            found[target.id] = ast.get_source_segment(code, node.value) or ""
    return found


def _code(text: str) -> str:
    """``text`` as a markdown code span inside a table cell."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    padded = f" {text} " if fence != "`" else text
    return f"{fence}{padded}{fence}".replace("|", r"\|")


def _read_notebook(content: bytes, path: Path) -> Any:
    import nbformat

    try:
        return nbformat.reads(content.decode("utf-8"), as_version=4)
    except (UnicodeDecodeError, ValueError) as error:  # NotJSONError is a ValueError
        raise ValueError(f"{path}: not a readable notebook ({error})") from None


def _remove_stale(staged_dir: Path, keep: set[Path]) -> None:
    """Delete staged notebooks not in ``keep``, then the folders that became empty."""
    for path in sorted(staged_dir.rglob("*.ipynb")):
        if path not in keep:
            logger.debug("removing stale %s", path)
            path.unlink()
    for folder in sorted((p for p in staged_dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):
            folder.rmdir()


def _require_file(path: Path, source: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (needed to build the book from {source})")


def build_book(
    source_dir: str | os.PathLike = ".",
    *,
    toc: str | os.PathLike,
    build_dir: str | os.PathLike | None = None,
    strict: bool = True,
) -> Path:
    """Build the book's HTML with Jupyter Book and check that it renders offline.

    Parameters
    ----------
    source_dir : path
        Folder holding ``_config.yml``; the Sphinx source directory.
    toc : path
        Table of contents (e.g. the one :func:`stage_plan` wrote), relative to ``source_dir`` unless
        absolute.
    build_dir : path, optional
        Folder that receives ``_build/`` (Jupyter Book's ``--path-output``); default ``source_dir``.
    strict : bool
        Treat every Sphinx warning (a dropped output, a broken reference) as an error and re-read every
        page, so that warnings of unchanged pages are reported again.

    Returns
    -------
    Path
        The folder with the HTML, ``<build_dir>/_build/html``.

    Raises
    ------
    FileNotFoundError
        If ``_config.yml`` or the table of contents is missing.
    BookBuildError
        If the build fails (the message ends with its warnings and last lines; the full log is
        ``<build_dir>/_build/build.log``) or a page references a remote or missing script or
        stylesheet.
    """
    source = Path(source_dir).resolve()
    output = Path(build_dir).resolve() if build_dir is not None else source
    toc_path = source / toc
    for required in (source / "_config.yml", toc_path):
        _require_file(required, source)

    # jupyter_book has no `python -m` entry point; calling its click main keeps this interpreter's env.
    command = [
        sys.executable,
        "-c",
        "from jupyter_book.cli.main import main; main()",
        "build",
        str(source),
        "--toc",
        str(toc_path),
        "--path-output",
        str(output),
    ]
    if strict:
        command += ["-W", "-n", "--keep-going", "--all"]
    logger.info("building the book: jupyter-book %s", " ".join(command[3:]))
    # Sphinx puts the year of SOURCE_DATE_EPOCH into the copyright line: the footer shows the build
    # year instead of the one typed in _config.yml. A caller's own value (reproducible builds) wins.
    env = {**os.environ, "SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", str(int(time.time())))}
    result = subprocess.run(
        command, cwd=source, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
    )
    log = _ANSI.sub("", result.stdout)
    log_path = output / "_build" / "build.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(log, encoding="utf-8")
    html_dir = output / "_build" / "html"
    if result.returncode != 0:
        raise BookBuildError(
            f"jupyter-book build {source} failed with exit status {result.returncode} "
            f"(full log: {log_path}):\n{_log_digest(log)}"
        )

    problems = check_offline(html_dir)
    if problems:
        listed = "\n".join(problems[:30])
        more = f"\n... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise BookBuildError(f"the book in {html_dir} would not render offline:\n{listed}{more}")
    logger.info("book built: %s", html_dir / "index.html")
    return html_dir


def _log_digest(log: str, *, warnings: int = 30, tail: int = 15) -> str:
    """Return the warning and error lines of a build log, then its last lines."""
    lines = log.splitlines()
    flagged = [line for line in lines if re.search(r"WARNING|ERROR|Error:|Exception", line)]
    parts = flagged[:warnings]
    if len(flagged) > warnings:
        parts.append(f"... ({len(flagged) - warnings} more warnings)")
    return "\n".join([*parts, "--- last lines ---", *lines[-tail:]])


def check_offline(html_dir: str | os.PathLike) -> list[str]:
    """List what in a built book would need a network, or is missing, to render.

    Every ``.html`` page (outside ``_static/``) is parsed and every ``.css`` file scanned for

    * ``<script src>``, ``<img src>``, ``<iframe src>`` and other fetched sources, and ``<link>``
      stylesheets, preloads and icons, that point at ``http(s)://`` or ``//`` URLs;
    * the same references pointing at local files that do not exist;
    * inline JavaScript naming a remote ``.js``/``.css`` file or a CDN host (e.g. require.js
      configuration or a lazily loaded library);
    * ``@import`` and ``url(...)`` of remote resources in ``<style>`` blocks, ``style`` attributes and
      stylesheets.

    Links the reader follows (``<a href>``) are not fetched and not reported.

    Parameters
    ----------
    html_dir : path
        The built HTML folder, e.g. ``_build/html``.

    Returns
    -------
    list of str
        One ``"<file>: <problem>"`` line per offending reference; empty when the book is offline-clean.

    Raises
    ------
    FileNotFoundError
        If ``html_dir`` is not a folder.
    """
    root = Path(html_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected a built book's HTML)")
    problems = []
    for page in sorted(root.rglob("*.html")):
        if "_static" in page.relative_to(root).parts:
            continue  # themes copy their Jinja macro templates there; they are not pages
        scanner = _PageScanner(page, root)
        scanner.feed(page.read_text(encoding="utf-8", errors="replace"))
        scanner.close()
        problems += [f"{page.relative_to(root)}: {problem}" for problem in scanner.problems]
    for sheet in sorted(root.rglob("*.css")):
        css = sheet.read_text(encoding="utf-8", errors="replace")
        problems += [f"{sheet.relative_to(root)}: stylesheet loads {url}" for url in _remote_css_urls(css)]
    return problems


def _is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "//"))


def _remote_css_urls(css: str) -> list[str]:
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)  # a commented-out @import fetches nothing
    return [match.group(2) for match in _CSS_REMOTE.finditer(css)]


class _PageScanner(HTMLParser):
    """Collect the references of one HTML page that need a network or point at missing files."""

    def __init__(self, page: Path, root: Path) -> None:
        super().__init__(convert_charrefs=True)
        self.page = page
        self.root = root
        self.problems: list[str] = []
        self._inline: str | None = None  # "script" or "style" while inside such an inline block

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if "style" in values:
            self._check_css(values["style"], f"<{tag} style>")
        if tag == "link":
            rels = set(values.get("rel", "").lower().split())
            if rels & _FETCHED_LINK_RELS and values.get("href"):
                self._check_reference(values["href"], f'<link rel="{values["rel"]}">')
        elif tag in _FETCHED_SRC_TAGS and values.get("src"):
            self._check_reference(values["src"], f"<{tag} src>")
        if tag == "script" and not values.get("src") and values.get("type", "").lower() in _JS_TYPES:
            self._inline = "script"
        elif tag == "style":
            self._inline = "style"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._inline = None

    def handle_data(self, data: str) -> None:
        if self._inline == "style":
            self._check_css(data, "<style>")
        elif self._inline == "script":
            for url in _URL_IN_JS.findall(data):
                host = urlsplit(url if "://" in url else "http:" + url).hostname or ""
                if re.search(r"\.(m?js|css)(\?|#|$)", url) or host in _CDN_HOSTS:
                    self.problems.append(f"inline script loads {url}")

    def _check_css(self, css: str, where: str) -> None:
        self.problems += [f"{where} loads {url}" for url in _remote_css_urls(css)]

    def _check_reference(self, url: str, where: str) -> None:
        if _is_remote(url):
            self.problems.append(f"{where} loads {url}")
            return
        parts = urlsplit(url)
        if parts.scheme or not parts.path:  # data:, blob:, javascript:, or a bare #fragment
            return
        base = self.root if parts.path.startswith("/") else self.page.parent
        target = (base / unquote(parts.path).lstrip("/")).resolve()
        if not target.is_file():
            self.problems.append(f"{where} points at missing file {url}")


def add_book_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``memstudy book`` to the ``memstudy`` command's subparsers.

    Parameters
    ----------
    subparsers
        The object returned by ``ArgumentParser.add_subparsers``.

    Returns
    -------
    argparse.ArgumentParser
        The ``book`` subcommand's parser.
    """
    parser = subparsers.add_parser(
        "book",
        help="build the book (offline HTML) from a plan's executed notebooks",
        description="Stage the plan's executed notebooks (RUNS_DIR/<plan name>/, written by memstudy "
        "study) into SOURCE/book/notebooks/<plan name>/ with a table of contents generated from the "
        "plan, build the Jupyter Book with warnings as errors, then check that no page loads anything "
        "from the network. Notebooks that are missing (not run or failed) are named in a warning and "
        "left out. The HTML goes to SOURCE/_build/html.",
    )
    parser.add_argument(
        "--plan",
        type=Path,
        default=Path("plans/default.yaml"),
        metavar="PLAN",
        help="the plan whose notebooks make the book (default: plans/default.yaml)",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("runs"),
        metavar="DIR",
        help="folder holding the plan's folder, as for memstudy study (default: runs)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="folder with _config.yml and the hand-written chapters in book/ (default: the current folder)",
    )
    parser.set_defaults(func=_book_command)
    return parser


def _book_command(args: argparse.Namespace) -> int:
    staged = stage_plan(args.plan, runs_dir=args.runs_dir, source=args.source)
    try:
        html_dir = build_book(args.source, toc=staged.toc)
    except BookBuildError as error:
        logger.error("%s", error)
        return 1
    logger.info("open %s", html_dir / "index.html")
    return 0
