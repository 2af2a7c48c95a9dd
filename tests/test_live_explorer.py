"""The live explorer, tested live: JupyterLab runs the explorer notebook in headless Chromium, the image
slider moves, and the kernel's new best match and r reach the page.

A tiny real run folder (one training step) is built here; the notebook is the committed
``memstudy/notebooks/explore.ipynb`` with its parameters injected as papermill injects them. JupyterLab
starts on 127.0.0.1 with a token and private Jupyter folders, and is shut down through its API, kernel
included, also when the test fails (a server that does not stop is killed, and fails the test).
Chromium is Debian's (Playwright's own download does not work offline); the test skips only where it is
missing.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import numpy as np
import pytest
from conftest import CHROMIUM_FLAGS, chromium_or_skip, float64_pearson
from lab_server import TOKEN, api, jupyterlab, wait_until

from memstudy.data import ImageSet
from memstudy.models.runs import sample_dir

NOTEBOOK = Path(__file__).resolve().parents[1] / "memstudy" / "notebooks" / "explore.ipynb"
# JupyterLab's page and memstudy's imports in its kernel take tens of seconds under load.
UI_TIMEOUT_MS = 180_000
# The panel carries r as the engine stores it (the exact r rounded once to float32, within 2^-25).
R_TOL = 1e-7
BEST = ".memstudy-explorer-panel .msb-matches .msb-match.msb-best"
CAPTION = ".memstudy-explorer-panel .msb-syn figcaption"


def kernel_states(base: str) -> list[tuple[str, bool]] | None:
    """(execution state, connected to a page) of each running kernel; None while one is launching."""
    try:
        kernels = api(base, "/api/kernels")
    except urllib.error.HTTPError as error:
        # jupyter_server lists a kernel before its launch sets `last_activity`, and answers 500 for it.
        if error.code != 500:
            raise
        return None
    return [(kernel["execution_state"], kernel["connections"] > 0) for kernel in kernels]


@pytest.fixture
def run(tmp_path, train_tiny) -> dict:
    """A real run folder (a tiny DDPM trained one step, as in tests/test_widgets.py) with one sample
    set: an exact copy of training image 3, then a noisy copy of training image 7."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 1, 16, 16), dtype=np.uint8)
    names = tuple(f"S{i // 3:03d}/z{i % 3:03d}" for i in range(12))  # 4 subjects of 3 slices
    folder = tmp_path / "training"
    # As a prepared dataset records it: params.json then names the folder the run's images are in.
    ImageSet(images, names, np.arange(12) // 3, ("gray",), {"cache_dir": str(folder)}).save(folder)
    training = ImageSet.load(folder)
    train_tiny("ddpm", training, tmp_path / "run", 1)
    noisy = np.clip(images[7].astype(int) + rng.integers(-60, 61, size=images[7].shape), 0, 255)
    synthetic = np.stack([images[3], noisy.astype(np.uint8)])
    ImageSet(synthetic, ("copy", "noisy"), np.arange(2), training.channels).save(
        sample_dir(tmp_path / "run", 1, 0)
    )
    return {"dir": tmp_path / "run", "training": training, "synthetic": synthetic}


def assert_shows(page, index: int, best: int, r: float) -> None:
    """The page shows synthetic image ``index`` with training image ``best`` as its best match at ``r``."""
    assert page.locator(CAPTION).inner_text() == f"synthetic #{index} (step_00000001-seed0)"
    tile = page.locator(BEST)
    assert int(tile.get_attribute("data-index")) == best
    assert abs(float(tile.get_attribute("data-r")) - r) <= R_TOL
    assert page.locator(".memstudy-explorer-panel .msb-r").inner_text().startswith(f"max r = {r:.4f}")


@pytest.mark.slow
def test_moving_the_slider_in_jupyterlab_shows_the_kernels_new_best_match(run, jupyter_kernel, tmp_path):
    chromium = chromium_or_skip()
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    from playwright.sync_api import sync_playwright

    r = float64_pearson(run["synthetic"], run["training"].images)
    expected = [(int(np.argmax(row)), float(row.max())) for row in r]
    assert expected[0][0] != expected[1][0] and expected[0][1] - expected[1][1] > 0.05  # a visible change

    lab = tmp_path / "lab"
    lab.mkdir()
    parameters = {"run_dir": str(run["dir"]), "holdout_split": None}
    notebook = parameterize_notebook(load_notebook_node(str(NOTEBOOK)), parameters)  # as `papermill -p`
    nbformat.write(notebook, lab / "explore.ipynb")

    problems: list[str] = []
    with jupyterlab(lab, tmp_path / "jupyter") as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            # Everything but the server is refused. A pattern, not a Python predicate: Playwright would
            # hold every request until this thread (asleep while polling the server) answered it.
            page.route(re.compile(rf"^(?!{re.escape(base)}/)"), lambda route: route.abort())
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(f"{base}/lab/tree/explore.ipynb?token={TOKEN}", timeout=UI_TIMEOUT_MS)
            # The notebook is open and its kernel (the project's) has started before the cells are run.
            page.locator(".jp-Notebook .jp-Cell").first.wait_for()
            wait_until(
                lambda: kernel_states(base) == [("idle", True)],
                "the notebook's kernel started, idle and connected to the page",
            )
            assert [s["kernel"]["name"] for s in api(base, "/api/sessions")] == [jupyter_kernel]
            page.locator("#jp-MainMenu").get_by_text("Run", exact=True).click()
            page.locator("li[data-command='runmenu:run-all']").click()

            page.locator(BEST).wait_for()
            assert_shows(page, 0, *expected[0])

            # The slider's handle takes the keyboard: one step right is image 1, searched by the kernel.
            handle = page.locator(".memstudy-explorer-index .noUi-handle")
            handle.focus()
            handle.press("ArrowRight")
            page.get_by_text("synthetic #1 (step_00000001-seed0)").wait_for()
            assert_shows(page, 1, *expected[1])
            assert page.locator(".memstudy-explorer-index-text input").input_value() == "1"
        finally:
            page.screenshot(path=tmp_path / "explorer.png", full_page=True)
            browser.close()
    assert problems == []
