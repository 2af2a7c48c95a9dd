"""Build the memstudy Jupyter Book so that it renders offline.

The book is Jupyter Book 1.x over notebooks already executed by papermill. Three things make it work
without a network or a kernel (see ``book/_vendor/README.md`` and ``_config.yml``):

* plotly figures are stored as ``text/html`` that calls a site-wide, vendored ``plotly.min.js``
  (:func:`use_offline_plotly_renderer`);
* ipywidgets render from the widget state saved in each notebook, through the vendored
  ``@jupyter-widgets/html-manager`` bundle instead of require.js and a CDN;
* MathJax is vendored too.

:func:`check_offline` verifies the result, and :func:`build_book` refuses a book that fails it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)

PLOTLY_RENDERER = "memstudy_offline"

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


def use_offline_plotly_renderer() -> None:
    """Make plotly figures display as HTML that renders in the offline book.

    Registers the renderer ``"memstudy_offline"`` with :mod:`plotly.io` and makes it the default. Safe to
    call any number of times; notebooks call it once in their imports cell (it returns nothing, so the
    cell shows no output).

    Notes
    -----
    Under papermill plotly picks its ``plotly_mimetype`` renderer, whose output myst-nb drops with only
    a warning. This renderer emits ``text/html`` alone, without plotly.js or MathJax: the book loads the
    vendored ``plotly.min.js`` once per page. Adding the plotly mimetype for live JupyterLab sessions is
    not possible, because myst-nb warns about it (which fails the ``-W`` build) even beside the HTML; so
    in a live session, where no page-wide plotly.js exists, these figures stay blank (use
    ``memstudy.widgets`` or plotly's own renderers there).
    """
    import plotly.io as pio
    from plotly.io.base_renderers import MimetypeRenderer

    class OfflineHtmlRenderer(MimetypeRenderer):
        def to_mimebundle(self, fig_dict: dict) -> dict:
            html = pio.to_html(
                fig_dict,
                full_html=False,
                include_plotlyjs=False,
                include_mathjax=False,
                default_width="100%",
                # As plotly's notebook renderers: an output cell has no height to take 100% of.
                default_height=525,
                validate=False,
            )
            return {"text/html": html}

    if PLOTLY_RENDERER not in pio.renderers:
        pio.renderers[PLOTLY_RENDERER] = OfflineHtmlRenderer()
    pio.renderers.default = PLOTLY_RENDERER


def build_book(
    source_dir: str | os.PathLike = ".",
    *,
    build_dir: str | os.PathLike | None = None,
    toc: str | os.PathLike = "book/_toc.yml",
    strict: bool = True,
) -> Path:
    """Build the book's HTML with Jupyter Book and check that it renders offline.

    Parameters
    ----------
    source_dir : path
        Folder holding ``_config.yml``; the Sphinx source directory.
    build_dir : path, optional
        Folder that receives ``_build/`` (Jupyter Book's ``--path-output``); default ``source_dir``.
    toc : path
        Table of contents, relative to ``source_dir`` unless absolute.
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
        if not required.is_file():
            raise FileNotFoundError(f"{required}: no such file (needed to build the book from {source})")

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
        help="build the book (offline HTML) from the executed notebooks",
        description="Build the Jupyter Book with warnings as errors, then check that no page loads "
        "anything from the network. The HTML goes to SOURCE/_build/html.",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="folder with _config.yml and book/_toc.yml (default: the current folder)",
    )
    parser.set_defaults(func=_book_command)
    return parser


def _book_command(args: argparse.Namespace) -> int:
    try:
        html_dir = build_book(args.source)
    except BookBuildError as error:
        logger.error("%s", error)
        return 1
    logger.info("open %s", html_dir / "index.html")
    return 0
