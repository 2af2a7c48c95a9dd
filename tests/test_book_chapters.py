"""The book's hand-written chapters agree with the repository: pages, citations, commands, settings.

Fast checks on the markdown sources; building the book is ``memstudy book`` (``tests/test_book.py``).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from memstudy.cli import build_parser
from memstudy.data.command import check_data_options, parse_data_options
from memstudy.data.datasets import DATASETS
from memstudy.models.configs import CONFIGS
from memstudy.study import load_plan

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
PAGES = sorted(BOOK.glob("*.md"))

# {cite}`a,b`, {cite:t}`a`, {cite:p}`a,b` (MyST roles).
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")
BIB_KEY = re.compile(r"^@\w+\{([^,\s]+),", re.MULTILINE)
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
# A remote URL in a place where a browser would fetch it: a script, stylesheet, font or image.
REMOTE_ASSET = re.compile(
    r"""(<(?:script|img|link|iframe|source|video|audio)\b[^>]*(?:src|href)\s*=\s*["']?(?:https?:)?//)"""
    r"""|(!\[[^\]]*\]\(\s*(?:https?:)?//)"""
    r"""|(https?://\S+\.(?:js|mjs|css|woff2?|ttf|otf|eot|png|jpe?g|gif|svg|webp)\b)""",
    re.IGNORECASE,
)


def toc_files(toc: dict) -> list[str]:
    """Every ``file:`` of a Jupyter Book toc, the root first."""
    files = [toc["root"]]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({key: value for key, value in toc.items() if key != "root"})
    return files


def memstudy_commands(markdown: str) -> list[str]:
    """The memstudy command lines of a page's bash blocks, continuation lines joined.

    A line counts when it starts with ``memstudy`` (or a path ending in ``/memstudy``), or runs
    ``-m memstudy.cli`` (under torchrun); other lines (variables, papermill) are skipped.
    """
    commands = []
    for language, body in FENCE.findall(markdown):
        if language not in ("bash", "sh", "console", "shell"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and (words[0] == "memstudy" or words[0].endswith("/memstudy")):
                commands.append(shlex.join(words[1:]))
            elif "memstudy.cli" in words:
                start = words.index("memstudy.cli")
                if start > 0 and words[start - 1] == "-m":
                    commands.append(shlex.join(words[start + 1 :]))
    return commands


def test_memstudy_commands_finds_commands_and_skips_other_lines() -> None:
    page = (
        "```bash\nX=1  # not a command\nmemstudy train data \\\n    --steps 5 --run-dir r\n"
        ".venv/bin/memstudy book\npapermill a.ipynb b.ipynb\n"
        "torchrun --nproc_per_node 2 -m memstudy.cli sample r -n 1\n```\n"
        "```python\nmemstudy = 1\n```\n"
    )
    assert memstudy_commands(page) == ["train data --steps 5 --run-dir r", "book", "sample r -n 1"]


def test_every_toc_page_exists() -> None:
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    files = toc_files(toc)
    assert "book/methods" in files and "book/rerun" in files and "book/references" in files
    # Executed notebooks appear only after `memstudy study`; the toc must list what the default plan makes.
    planned = {
        str(execution.output.with_suffix("").relative_to(ROOT))
        for execution in load_plan(ROOT / "plans" / "default.yaml", output_dir=ROOT / "book" / "notebooks")
    }
    generated = {f for f in files if f.startswith("book/notebooks/")}
    assert generated == planned
    for name in files:
        if name not in generated:
            assert (ROOT / f"{name}.md").is_file() or (ROOT / f"{name}.ipynb").is_file(), name


def test_every_citation_is_in_the_bibliography() -> None:
    keys = set(BIB_KEY.findall((BOOK / "references.bib").read_text()))
    cited = {
        key.strip() for page in PAGES for group in CITE.findall(page.read_text()) for key in group.split(",")
    }
    assert cited, "no page cites anything"
    assert not cited - keys, f"cited but not in book/references.bib: {sorted(cited - keys)}"


def test_bibliography_keys_are_unique() -> None:
    keys = BIB_KEY.findall((BOOK / "references.bib").read_text())
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_shown_parses(page: Path) -> None:
    parser = build_parser()
    for command in memstudy_commands(page.read_text()):
        try:
            parser.parse_args(shlex.split(command))
        except SystemExit as error:  # argparse exits on a bad command line
            pytest.fail(f"{page.name}: `memstudy {command}` does not parse (exit {error.code})")
        # --data-option values reach the loader only at run time: check them against its signature.
        args = parser.parse_args(shlex.split(command))
        names = [getattr(args, a, None) for a in ("data", "synthetic", "training")]
        for name in {n for n in names if n in DATASETS}:
            check_data_options(name, parse_data_options(getattr(args, "data_options", None) or []))


def test_rerun_page_shows_each_step() -> None:
    commands = memstudy_commands((BOOK / "rerun.md").read_text())
    for step in ("data prepare", "train", "sample", "correlate", "study", "book"):
        assert any(c.startswith(step) for c in commands), step
    assert any("--holdout authors" in c for c in commands)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_remote_assets(page: Path) -> None:
    found = [m.group(0) for m in REMOTE_ASSET.finditer(page.read_text())]
    assert not found, f"{page.name} loads from the network: {found}"


def test_remote_asset_pattern_catches_each_kind() -> None:
    for text in (
        '<script src="https://cdn.example.org/x.js"></script>',
        '<link rel="stylesheet" href="//fonts.example.org/a.css">',
        "![scan](https://example.org/scan.png)",
        "see https://example.org/font.woff2 for the font",
    ):
        assert REMOTE_ASSET.search(text), text
    assert not REMOTE_ASSET.search("the paper (https://doi.org/10.1088/2632-2153/ad9a3a)")


def cell_text(value: object) -> str:
    """How the methods tables write a configuration value (None: '—', empty tuple: 'none')."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ", ".join(cell_text(v) for v in value) if value else "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def config_tables(markdown: str) -> dict[str, list[list[str]]]:
    """Rows of each table that follows a ``% config-table: MODEL`` comment."""
    tables = {}
    for match in re.finditer(r"^% config-table: (\w+)\n\n((?:\|.*\n)+)", markdown, re.MULTILINE):
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in match[2].splitlines()]
        tables[match[1]] = rows[2:]  # after the header and the --- line
    return tables


def test_methods_tables_match_the_presets() -> None:
    tables = config_tables((BOOK / "methods.md").read_text())
    assert set(tables) == set(CONFIGS)
    for model, rows in tables.items():
        assert rows
        for field, _paper, ours_paper, ours_tiny in rows:
            name = field.strip("`")
            for preset, shown in (("paper", ours_paper), ("tiny", ours_tiny)):
                expected = cell_text(getattr(CONFIGS[model][preset], name))
                assert shown == expected, (
                    f"{model} {preset}.{name}: the book says {shown}, the code {expected}"
                )


def test_cell_text_formats() -> None:
    assert [cell_text(v) for v in (None, True, (), (16, 8), 2.5e-05, 0.0001, 1.0, 64)] == [
        "—", "yes", "none", "16, 8", "2.5e-05", "0.0001", "1", "64",
    ]  # fmt: skip
