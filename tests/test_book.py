"""The offline book: a plan's executed notebooks are staged with a generated table of contents, titled
and with their parameters as a table; the book builds with -W and renders without a network or kernel."""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import logging
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import probe_in_chromium

from memstudy.book import (
    BookBuildError,
    add_book_command,
    build_book,
    check_offline,
    stage_plan,
)
from memstudy.figures import use_offline_plotly_renderer

REPO = Path(__file__).resolve().parents[1]
PAGE = Path("book", "notebooks", "demo.html")

CELLS = [
    ("markdown", "# Demo\n\nThe area of a square of side $x$ is $x^2$."),
    (
        "code",
        "import io\n\nimport ipywidgets as widgets\nimport plotly.graph_objects as go\n"
        "from PIL import Image\n\nfrom memstudy.figures import use_offline_plotly_renderer\n\n"
        "use_offline_plotly_renderer()",
    ),
    ("code", "go.Figure(go.Scatter(y=[1, 3, 2], mode='lines+markers'))"),
    (
        "code",
        "def png(color):\n"
        "    buffer = io.BytesIO()\n"
        "    Image.new('RGB', (32, 32), color).save(buffer, format='PNG')\n"
        "    return buffer.getvalue()\n\n"
        "stack = widgets.Stack([widgets.Image(value=png('red')), widgets.HTML('<b>second child</b>')], "
        "selected_index=0)\n"
        "dropdown = widgets.Dropdown(options=[('first', 0), ('second', 1)], value=0)\n"
        "widgets.jslink((dropdown, 'index'), (stack, 'selected_index'))\n"
        "tab = widgets.Tab([widgets.Image(value=png('blue')), widgets.HTML('<i>tab two</i>')], "
        "titles=('one', 'two'))\n"
        "widgets.VBox([dropdown, stack, tab])",
    ),
]


def write_book(root: Path, notebook: nbformat.NotebookNode) -> Path:
    """Lay out a one-page book like the project's: root _config.yml, book/_toc.yml, vendored assets."""
    (root / "book" / "notebooks").mkdir(parents=True)
    shutil.copy(REPO / "_config.yml", root)
    shutil.copy(REPO / "book" / "references.bib", root / "book")
    shutil.copytree(REPO / "book" / "_vendor", root / "book" / "_vendor")
    (root / "book" / "_toc.yml").write_text("format: jb-book\nroot: book/notebooks/demo\n")
    path = root / "book" / "notebooks" / "demo.ipynb"
    nbformat.write(notebook, path)
    return path


@pytest.fixture(scope="module")
def book_html(tmp_path_factory, jupyter_kernel) -> Path:
    """Execute the demo notebook with papermill, as the study does, and build the book from it."""
    import papermill

    root = tmp_path_factory.mktemp("book")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        for kind, source in CELLS
    ]
    executed = write_book(root, notebook)
    papermill.execute_notebook(executed, executed, kernel_name=jupyter_kernel, progress_bar=False)
    return build_book(root, toc="book/_toc.yml")


@pytest.mark.slow
def test_plotly_figure_widget_state_and_math_reach_the_page(book_html):
    page = (book_html / PAGE).read_text()
    assert page.count('class="plotly-graph-div"') == 1
    state = re.search(r'<script type="application/vnd.jupyter.widget-state\+json">(.*?)</script>', page, re.S)
    models = {model["model_name"] for model in json.loads(state.group(1))["state"].values()}
    assert {"StackModel", "TabModel", "DropdownModel", "LinkModel", "ImageModel", "HTMLModel"} <= models
    assert r"\(x^2\)" in page


@pytest.mark.slow
def test_footer_copyright_year_is_the_build_year(book_html):
    footer = re.search(r"©\s*Copyright\s*(\d{4})", (book_html / PAGE).read_text())
    assert footer and int(footer.group(1)) == datetime.date.today().year


@pytest.mark.slow
def test_built_book_loads_only_local_scripts_that_exist(book_html):
    assert check_offline(book_html) == []
    page = (book_html / PAGE).read_text()
    sources = [src.split("?")[0] for src in re.findall(r'<script[^>]*\bsrc="([^"]+)"', page)]
    assert not [src for src in sources if "//" in src]
    assert [src for src in sources if not (book_html / PAGE).parent.joinpath(src).resolve().is_file()] == []
    for vendored in ("plotly/plotly.min.js", "html-manager/embed.js", "mathjax/tex-chtml-full.js"):
        assert f"../../_static/{vendored}" in sources
    assert "require.js" not in page and "unpkg.com" not in page


@pytest.mark.slow
def test_plotly_mimetype_output_fails_the_strict_build(tmp_path):
    # What plotly's default renderer writes under papermill: myst-nb drops it with only a warning.
    cell = nbformat.v4.new_code_cell("fig", execution_count=1)
    cell.outputs = [nbformat.v4.new_output("display_data", {"application/vnd.plotly.v1+json": {"data": []}})]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Dropped"), cell])
    write_book(tmp_path, notebook)
    with pytest.raises(BookBuildError, match=r"unknown output mime type: application/vnd\.plotly\.v1\+json"):
        build_book(tmp_path, toc="book/_toc.yml")
    assert (tmp_path / "_build" / "build.log").is_file()


def test_check_offline_reports_cdn_scripts_styles_and_missing_files(tmp_path):
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "here.js").write_text("")
    (tmp_path / "_static" / "theme.css").write_text(
        "/* @import url('https://fonts.googleapis.com/css?family=Roboto'); */\n"
        "@font-face { src: url(https://fonts.gstatic.com/x.woff2) }"
    )
    (tmp_path / "page.html").write_text(
        """<html><head>
        <script src="https://cdnjs.cloudflare.com/ajax/libs/require.js/2.3.4/require.min.js"></script>
        <script src="_static/here.js?v=1"></script>
        <script src="_static/gone.js"></script>
        <link rel="stylesheet" href="//cdn.example.org/style.css">
        <link rel="canonical" href="https://example.org/page.html">
        <style>@import "https://cdn.example.org/more.css";</style>
        <script>require.config({paths: {jquery: "https://code.jquery.com/jquery"}})</script>
        <script type="application/vnd.jupyter.widget-state+json">{"url": "https://cdn.jsdelivr.net/x.js"}</script>
        </head><body><a href="https://arxiv.org/abs/2305.07644">paper</a></body></html>"""
    )
    assert check_offline(tmp_path) == [
        "page.html: <script src> loads https://cdnjs.cloudflare.com/ajax/libs/require.js/2.3.4/require.min.js",
        "page.html: <script src> points at missing file _static/gone.js",
        'page.html: <link rel="stylesheet"> loads //cdn.example.org/style.css',
        "page.html: <style> loads https://cdn.example.org/more.css",
        "page.html: inline script loads https://code.jquery.com/jquery",
        "_static/theme.css: stylesheet loads https://fonts.gstatic.com/x.woff2",
    ]


def test_offline_renderer_is_idempotent_and_leaves_out_plotlyjs():
    import plotly.graph_objects as go
    import plotly.io as pio

    use_offline_plotly_renderer()
    use_offline_plotly_renderer()
    assert pio.renderers.default == "memstudy_offline"
    bundle = go.Figure(go.Bar(y=[1, 2]))._repr_mimebundle_()
    assert list(bundle) == ["text/html"]
    assert 'class="plotly-graph-div"' in bundle["text/html"]
    assert "<script src" not in bundle["text/html"] and "cdn.plot.ly" not in bundle["text/html"]


def test_vendored_plotlyjs_is_the_installed_packages_copy():
    import plotly

    installed = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    vendored = REPO / "book" / "_vendor" / "plotly" / "plotly.min.js"
    assert vendored.read_bytes() == installed.read_bytes(), "plotly changed: run book/_vendor/fetch.sh"


def test_book_command_parses_its_options_and_a_missing_config_is_named(tmp_path):
    parser = argparse.ArgumentParser(prog="memstudy")
    add_book_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["book", "--plan", "p.yaml", "--runs-dir", "r", "--source", str(tmp_path)])
    assert (args.plan, args.runs_dir, args.source) == (Path("p.yaml"), Path("r"), tmp_path)
    defaults = parser.parse_args(["book"])
    assert (defaults.plan, defaults.runs_dir, defaults.source) == (
        Path("plans/default.yaml"),
        Path("runs"),
        Path("."),
    )
    with pytest.raises(FileNotFoundError, match=r"_config\.yml: no such file"):
        args.func(args)
    assert not (tmp_path / "book").exists()


PROBE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const shown = () => {
    const html = [...document.querySelectorAll(".widget-html")];
    const child = html.find((e) => e.textContent === "second child");
    return Boolean(child) && !child.classList.contains("lm-mod-hidden");
  };
  const before = shown();
  const images = document.querySelectorAll("img.widget-image").length;
  const select = document.querySelector(".widget-dropdown select");
  select.selectedIndex = 1;
  select.dispatchEvent(new Event("change", {bubbles: true}));
  setTimeout(() => {
    document.body.dataset.probe = JSON.stringify({
      plots: [...document.querySelectorAll(".plotly-graph-div")].filter((e) => e.querySelector(".main-svg"))
        .length,
      tabs: document.querySelectorAll(".widget-tab").length,
      images: images,
      math: document.querySelectorAll("mjx-container").length,
      before: before,
      after: shown(),
    });
  }, 500);
}, 1000));
</script></body>"""


@pytest.mark.slow
def test_page_renders_offline_in_headless_chromium(book_html, tmp_path):
    # A copy of the page that, once loaded, picks "second" in the dropdown (jslink-ed to the Stack, which
    # then shows its HTML child instead of its image) and reports what it sees before and after.
    probe = book_html / PAGE.with_name("probe.html")
    probe.write_text((book_html / PAGE).read_text().replace("</body>", PROBE))
    seen = probe_in_chromium(probe, tmp_path, budget_ms=8000)
    assert seen == {"plots": 1, "tabs": 1, "images": 2, "math": 2, "before": False, "after": True}


# A plan's executed notebooks → the book's pages and table of contents (no kernel: notebooks are made
# with nbformat, parameters injected by papermill's own function, as `papermill -p` does).

TINY_PLAN = """\
name: tiny
datasets:
  cxr-phantom: {options: {size: 16}, train_subjects: [2]}
  brain-phantom: {options: {size: 16, holdout: 1}, train_subjects: [1]}
models:
  ddpm: {steps: 4, checkpoints: [4], overrides: {batch_size: 2}}
"""
PAGES = "book/notebooks/tiny"
NOT_RUN = "brain-phantom/ddpm/n1-s0/04_memorization-4.ipynb"
FAILED = "cxr-phantom/ddpm/n2-s0/03_sample-4.ipynb"  # the workflow keeps only 03_sample-4.failed.ipynb
FAILED_IN_PLACE = "cxr-phantom/ddpm/n2-s0/04_memorization-4.ipynb"  # papermill's exception mark
DEFAULTS = "dataset = 'brain-phantom'  # a comment\nsize = 64\nextra = {'a': [1, 2]}"


def executed_notebook(
    parameters: dict, *, failed: bool = False, output: str = "done", defaults: str = DEFAULTS
) -> nbformat.NotebookNode:
    """A notebook as papermill leaves it: heading, defaults, injected parameters, one output."""
    from papermill.parameterize import parameterize_notebook

    notebook = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}}
    )
    notebook.metadata["papermill"] = {}
    parameters_cell = nbformat.v4.new_code_cell(defaults, metadata={"tags": ["parameters"]})
    work = nbformat.v4.new_code_cell("print(dataset)", execution_count=3)
    work.outputs = [nbformat.v4.new_output("stream", name="stdout", text=output)]
    notebook.cells = [
        nbformat.v4.new_markdown_cell("Intro text\n# Step heading\n\n**Overview.** What it does."),
        parameters_cell,
        work,
    ]
    for cell in notebook.cells:  # as papermill's notebook loader leaves them
        cell.metadata.setdefault("tags", [])
    notebook = parameterize_notebook(notebook, parameters)
    notebook.metadata.papermill["exception"] = True if failed else None
    return notebook


@pytest.fixture
def tiny_plan(tmp_path):
    """A plan with 2 datasets × 1 model × 1 size × 1 checkpoint, every notebook executed except two:
    one never ran, two failed. Returns (plan file, runs folder, book source, jobs)."""
    from memstudy.workflow.plan import load_plan

    plan = tmp_path / "tiny.yaml"
    plan.write_text(TINY_PLAN)
    runs, source = tmp_path / "runs", tmp_path / "source"
    source.mkdir()
    (source / "_config.yml").write_text("title: test\n")
    (source / "book").mkdir()
    shutil.copy(REPO / "book" / "discussion.md", source / "book")  # the plan's discussion starts from it
    jobs = load_plan(plan).jobs()
    for job in jobs:
        if job.notebook != NOT_RUN:
            path = runs / "tiny" / job.notebook
            if job.notebook == FAILED:
                path = path.with_suffix(".failed.ipynb")
            path.parent.mkdir(parents=True, exist_ok=True)
            failed = job.notebook in (FAILED, FAILED_IN_PLACE)
            nbformat.write(executed_notebook(job.parameters, failed=failed), path)
    return plan, runs, source, jobs


def page_files(toc: dict) -> list[str]:
    return [toc["root"]] + [
        entry["file"]
        for part in toc["parts"]
        for chapter in part["chapters"]
        for entry in [chapter, *chapter.get("sections", [])]
    ]


def parameter_table(notebook: nbformat.NotebookNode) -> dict[str, str]:
    """The staged notebook's parameter table: name → the cell's text (code span unwrapped)."""
    [cell] = [c for c in notebook.cells if "memstudy-parameters" in c.metadata.get("tags", [])]
    rows = re.findall(r"^\| `(\w+)` \| `(.*)`(.*) \|$", cell.source, re.MULTILINE)
    return {name: (value.replace(r"\|", "|"), note.strip()) for name, value, note in rows}


def test_toc_lists_the_executed_notebooks_in_plan_order_grouped_by_part(tiny_plan):
    plan, runs, source, _ = tiny_plan
    staged = stage_plan(plan, runs_dir=runs, source=source)
    toc = yaml.safe_load(staged.toc.read_text())
    assert staged.toc == source / PAGES / "_toc.yml"
    cxr, brain = f"{PAGES}/cxr-phantom", f"{PAGES}/brain-phantom"
    assert toc == {
        "format": "jb-book",
        "root": "book/intro",
        "parts": [
            {"caption": "The study", "chapters": [{"file": "book/methods"}]},
            {"caption": "Data", "chapters": [{"file": f"{cxr}/01_data"}, {"file": f"{brain}/01_data"}]},
            {
                "caption": "cxr-phantom × DDPM",
                "chapters": [{"file": f"{cxr}/ddpm/n2-s0/02_train"}],
            },
            {
                "caption": "brain-phantom × DDPM",
                "chapters": [
                    {
                        "file": f"{brain}/ddpm/n1-s0/02_train",
                        "sections": [{"file": f"{brain}/ddpm/n1-s0/03_sample-4"}],
                    }
                ],
            },
            {"caption": "Comparison", "chapters": [{"file": f"{PAGES}/05_compare"}]},
            # The comparison notebook is staged, so the discussion is the plan's (with the paper's findings).
            {"caption": "Discussion", "chapters": [{"file": f"{PAGES}/discussion"}]},
            {
                "caption": "Use it",
                "chapters": [
                    {"file": "book/rerun"},
                    {"file": "book/teaching"},
                    {"file": f"{PAGES}/explore"},  # the live explorer, after the exercises that use it
                    {"file": "book/references"},
                ],
            },
        ],
    }
    staged_files = {
        p.relative_to(source).with_suffix("").as_posix()
        for p in (source / PAGES).rglob("*")
        if p.suffix in (".ipynb", ".md")
    }
    assert staged_files == {f for f in page_files(toc) if f.startswith(PAGES)}
    assert staged.missing == [FAILED, FAILED_IN_PLACE, NOT_RUN]
    # No memorization notebook is staged, so no part has a results page.
    assert not list((source / PAGES).rglob("results.md"))


def test_missing_and_failed_notebooks_are_named_in_one_warning(tiny_plan, caplog):
    plan, runs, source, _ = tiny_plan
    with caplog.at_level(logging.WARNING, logger="memstudy"):
        stage_plan(plan, runs_dir=runs, source=source)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert f"{FAILED} (failed)" in message and f"{FAILED_IN_PLACE} (failed)" in message
    assert NOT_RUN in message and f"{NOT_RUN} (failed)" not in message
    assert "3 of 9 notebooks" in message and "\n" not in message


def test_pages_are_titled_by_their_job_and_show_the_injected_parameters_as_a_table(tiny_plan):
    plan, runs, source, jobs = tiny_plan
    stage_plan(plan, runs_dir=runs, source=source)
    titles = []
    for job in jobs:
        if job.notebook in (NOT_RUN, FAILED, FAILED_IN_PLACE):
            continue
        notebook = nbformat.read(source / PAGES / job.notebook, as_version=4)
        heading = notebook.cells[0].source.split("\n")
        assert heading[:3] == ["Intro text", f"# {job.title}", ""], job.notebook
        titles.append(job.title)
        table = parameter_table(notebook)
        injected = {name: ast.literal_eval(value) for name, (value, note) in table.items() if not note}
        assert injected == job.parameters
        defaults = {name: (value, note) for name, (value, note) in table.items() if note}
        expected = {
            "size": ("64", "(notebook default)"),
            "dataset": ("'brain-phantom'", "(notebook default)"),
        }
        expected = {k: v for k, v in expected.items() if k not in job.parameters}
        assert defaults == {**expected, "extra": ("{'a': [1, 2]}", "(notebook default)")}
        hidden = [c for c in notebook.cells if "remove-cell" in c.metadata.get("tags", [])]
        assert [c.metadata["tags"][0] for c in hidden] == ["parameters", "injected-parameters"]
        shown = [c for c in notebook.cells if c not in hidden]
        assert [c.cell_type for c in shown] == ["markdown", "markdown", "code"]
        assert shown[2].outputs[0]["text"] == "done"
    assert len(titles) == len(set(titles)) == 6
    assert titles[0] != titles[1] and {"Data: cxr-phantom (16 px)", "Data: brain-phantom (16 px)"} <= set(
        titles
    )


def test_a_value_with_a_pipe_or_backtick_stays_in_its_table_cell_and_an_expression_shows_as_written():
    from memstudy.book import present_notebook

    notebook = executed_notebook(
        {"pattern": "a|b", "quote": "x`y"}, defaults="pattern = None\nscale: float = 2 ** -3\nn = len('ab')"
    )
    present_notebook(notebook, "Title")
    [table] = [c for c in notebook.cells if "memstudy-parameters" in c.metadata.get("tags", [])]
    assert table.source.splitlines()[4:] == [
        r"| `pattern` | `'a\|b'` |",
        "| `quote` | `` 'x`y' `` |",
        "| `scale` | `2 ** -3` (notebook default) |",
        "| `n` | `len('ab')` (notebook default) |",
    ]


def test_restaging_rewrites_only_changed_notebooks_and_removes_stale_ones(tiny_plan):
    plan, runs, source, jobs = tiny_plan
    stage_plan(plan, runs_dir=runs, source=source)
    staged = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (source / PAGES).rglob("*.ipynb")}
    changed, removed = jobs[0].notebook, "brain-phantom/ddpm/n1-s0/03_sample-4.ipynb"
    nbformat.write(executed_notebook(jobs[0].parameters, output="new output"), runs / "tiny" / changed)
    (runs / "tiny" / removed).unlink()

    result = stage_plan(plan, runs_dir=runs, source=source)
    now = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (source / PAGES).rglob("*.ipynb")}
    assert set(staged) - set(now) == {source / PAGES / removed}
    rewritten = {p for p in now if now[p] != staged[p]}
    assert rewritten == {source / PAGES / changed}
    restaged = nbformat.read(source / PAGES / changed, as_version=4)
    assert [o["text"] for c in restaged.cells if c.cell_type == "code" for o in c.outputs] == ["new output"]
    assert removed not in result.pages and removed in result.missing
    assert f"{PAGES}/{removed.removesuffix('.ipynb')}" not in page_files(
        yaml.safe_load(result.toc.read_text())
    )


def test_a_plan_that_has_not_run_is_a_clear_error(tiny_plan):
    plan, runs, source, _ = tiny_plan
    shutil.rmtree(runs / "tiny")
    for folder in (runs / "tiny", tmp := runs.parent / "elsewhere" / "tiny"):
        folder.mkdir(parents=True)
        runs_dir = folder.parent
        with pytest.raises(
            FileNotFoundError, match=r"no executed notebook of plan 'tiny'.*run `memstudy study --plan "
        ):
            stage_plan(plan, runs_dir=runs_dir, source=source)
    with pytest.raises(FileNotFoundError, match=rf"--runs-dir {re.escape(str(tmp.parent))}` first"):
        stage_plan(plan, runs_dir=tmp.parent, source=source)
    assert not (source / PAGES).exists()


GLUE_ROLE = re.compile(r"\{glue:text\}`([^`]+)::(\w[\w-]*):([^`]+)`")


def test_results_pages_and_the_discussion_paste_from_staged_notebooks_only(tiny_plan):
    plan, runs, source, jobs = tiny_plan
    for name in (FAILED_IN_PLACE, NOT_RUN):  # now both memorization notebooks ran
        nbformat.write(
            executed_notebook(next(j for j in jobs if j.notebook == name).parameters), runs / "tiny" / name
        )
    staged = stage_plan(plan, runs_dir=runs, source=source)
    toc = yaml.safe_load(staged.toc.read_text())
    pages = source / PAGES
    for job in (j for j in jobs if j.step == "memorization"):
        results = pages / job.run.dataset / job.run.model / "results.md"
        text = results.read_text()
        roles = GLUE_ROLE.findall(text)
        notebooks = {(results.parent / path).resolve() for path, _, _ in roles}
        # One row per memorization notebook of the part, and the comparison notebook's statement.
        assert notebooks == {(pages / job.notebook).resolve(), (pages / "05_compare.ipynb").resolve()}
        assert all(path.is_file() for path in notebooks)
        assert f"| {job.run.n_subjects} | {job.run.seed} | {job.checkpoint} |" in text
        part = next(p for p in toc["parts"] if p["caption"].startswith(job.run.dataset))
        assert part["chapters"][0] == {"file": f"{PAGES}/{job.run.dataset}/{job.run.model}/results"}
    discussion = (pages / "discussion.md").read_text()
    assert {path for path, _, _ in GLUE_ROLE.findall(discussion)} == {"05_compare.ipynb"}
    assert "<!-- memstudy: against the paper -->" not in discussion
    assert discussion.startswith((REPO / "book" / "discussion.md").read_text().split("<!--")[0])


def test_without_a_staged_comparison_the_hand_written_discussion_is_listed(tiny_plan):
    plan, runs, source, _ = tiny_plan
    (runs / "tiny" / "05_compare.ipynb").unlink()
    staged = stage_plan(plan, runs_dir=runs, source=source)
    toc = yaml.safe_load(staged.toc.read_text())
    assert {"caption": "Discussion", "chapters": [{"file": "book/discussion"}]} in toc["parts"]
    assert not (source / PAGES / "discussion.md").exists()


def test_a_discussion_without_its_marker_is_named(tiny_plan):
    plan, runs, source, _ = tiny_plan
    (source / "book" / "discussion.md").write_text("# Discussion\n\nNo marker.\n")
    with pytest.raises(
        ValueError, match=r"discussion\.md: expected the line '<!-- memstudy: against the paper -->'"
    ):
        stage_plan(plan, runs_dir=runs, source=source)
