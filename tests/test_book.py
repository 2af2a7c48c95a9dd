"""The offline book: an executed notebook builds with -W and renders without a network or a kernel."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from conftest import probe_in_chromium

from memstudy.book import (
    BookBuildError,
    add_book_command,
    build_book,
    check_offline,
    use_offline_plotly_renderer,
)

REPO = Path(__file__).resolve().parents[1]
PAGE = Path("book", "notebooks", "demo.html")

CELLS = [
    ("markdown", "# Demo\n\nThe area of a square of side $x$ is $x^2$."),
    (
        "code",
        "import io\n\nimport ipywidgets as widgets\nimport plotly.graph_objects as go\n"
        "from PIL import Image\n\nfrom memstudy.book import use_offline_plotly_renderer\n\n"
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
    return build_book(root)


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
        build_book(tmp_path)
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


def test_book_command_parses_source_and_a_missing_config_is_named(tmp_path):
    parser = argparse.ArgumentParser(prog="memstudy")
    add_book_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["book", "--source", str(tmp_path)])
    assert args.source == tmp_path
    with pytest.raises(FileNotFoundError, match=r"_config\.yml: no such file"):
        args.func(args)


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
