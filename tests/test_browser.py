"""The static nearest-match browser: expected images and numbers, the cap, privacy, offline, in a browser."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from conftest import float64_pearson, probe_in_chromium
from PIL import Image
from test_figures import neighbours_by_name, volumes

from memstudy.analysis import memorization_report
from memstudy.book import check_offline
from memstudy.browser import DEFAULT_MAX_IMAGES, match_browser_html
from memstudy.data import ImageSet

DATA = re.compile(r'<script type="application/json" class="msb-data">(.*?)</script>', re.S)
URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


@pytest.fixture(scope="module")
def study() -> dict:
    training = volumes(0, 6, 8, 0)
    training = ImageSet(
        training.images,
        training.names,
        training.groups,
        training.channels,
        {"classes": ["odd" if g % 2 else "even" for g in training.groups]},
    )
    holdout = volumes(1, 20, 3, 100)
    synthetic = np.concatenate([training.images[[3, 12, 25]], volumes(2, 12, 1, 200).images])
    report = memorization_report(synthetic, training, holdout, k=4)
    return {"training": training, "synthetic": synthetic, "report": report}


def page_data(page: str) -> dict:
    return json.loads(DATA.search(page).group(1).replace("<\\/", "</"))


def decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def png_base64(picture: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_page_holds_each_image_with_its_matches_provenance_and_baseline(study):
    training, synthetic, report = study["training"], study["synthetic"], study["report"]
    page = match_browser_html(report, synthetic, training, k=3, max_images=6)
    data = page_data(page)
    r = float64_pearson(synthetic, training.images)
    order = [item["index"] for item in data["items"]]
    assert sorted(order[:3]) == [0, 1, 2]  # the exact copies first, then by max r
    assert np.all(np.diff(report.max_r[order]) <= 0) and len(order) == 6
    holdout = report.holdout_max_r[np.isfinite(report.holdout_max_r)]
    for item in data["items"]:
        i = item["index"]
        np.testing.assert_array_equal(decode(data["images"][item["image"]]), synthetic[i, 0])
        reference = np.argsort(-r[i], kind="stable")[:3]
        assert [training.names.index(m["name"]) for m in item["matches"]] == reference.tolist()
        for m, j in zip(item["matches"], reference, strict=True):
            np.testing.assert_array_equal(decode(data["images"][m["image"]]), training.images[j, 0])
            # r is stored to 6 decimals: |stored - exact| <= 5e-7 + float32 rounding (6e-8).
            assert m["r"] == pytest.approx(r[i, j], abs=6e-7)
            assert (m["subject"], m["slice"]) == (training.groups[j], int(training.names[j][-3:]))
            assert m["class"] == ("odd" if training.groups[j] % 2 else "even")
        near = neighbours_by_name(training.names, int(reference[0]), 2)
        assert [n["name"] for n in item["neighbours"]] == [training.names[n] for n in near]
        assert [n["match"] for n in item["neighbours"]] == [n == reference[0] for n in near]
        assert item["percentile"] == pytest.approx(100 * np.mean(holdout <= r[i].max()), abs=0.006)
    assert (np.array([item["copy"] for item in data["items"]]) == np.isin(order, report.likely_copies)).all()


def test_page_states_and_keeps_its_cap_and_random_order_is_seeded(study):
    report, n = study["report"], study["report"].max_r.size
    page = match_browser_html(
        report, study["synthetic"], study["training"], max_images=4, order="random", seed=3
    )
    assert "Showing 4 of 15 synthetic images (cap: max_images=4)" in page
    indices = [item["index"] for item in page_data(page)["items"]]
    assert indices == np.random.default_rng(3).permutation(n)[:4].tolist()
    assert len(URI.findall(page)) == len(set(URI.findall(page)))  # each image once


def test_bad_options_are_refused_with_their_name(study):
    args = (study["report"], study["synthetic"], study["training"])
    with pytest.raises(ValueError, match="order"):
        match_browser_html(*args, order="best")
    with pytest.raises(ValueError, match="k must be between 1 and the report's k"):
        match_browser_html(*args, k=5)
    with pytest.raises(ValueError, match="synthetic has 14 images"):
        match_browser_html(args[0], args[1][:-1], args[2])


def training_encodings(picture: np.ndarray) -> list[str]:
    """Ways a page could carry a training image: base64 PNG, and base64 / latin-1 / decimal raw bytes."""
    raw = picture.tobytes()
    return [
        png_base64(picture),
        base64.b64encode(raw).decode(),
        raw.decode("latin-1"),
        ",".join(str(v) for v in picture.ravel()),
    ]


def test_without_training_images_no_training_pixel_is_in_the_page(study):
    training, synthetic, report = study["training"], study["synthetic"], study["report"]
    copies = {3, 12, 25}  # the synthetic images that are exact copies necessarily carry those pixels

    def leaked(page: str) -> set[int]:
        pictures = [decode("data:," + b) for b in URI.findall(page)]
        return {
            j
            for j in range(len(training))
            if any(code in page for code in training_encodings(training.images[j, 0]))
            or any(np.array_equal(p, training.images[j, 0]) for p in pictures)
        }

    shown = match_browser_html(report, synthetic, training)
    assert len(leaked(shown) - copies) > 10  # the check finds training images when they are there
    hidden = match_browser_html(report, synthetic, training, show_training_images=False)
    assert leaked(hidden) <= copies
    data = page_data(hidden)
    assert len(data["images"]) == len(data["items"]) == len(synthetic)
    assert all(m["image"] is None for item in data["items"] for m in item["matches"] + item["neighbours"])
    assert "show_training_images=False" in hidden


def test_page_loads_nothing_from_the_network(study, tmp_path):
    for show in (True, False):
        page = match_browser_html(
            study["report"], study["synthetic"], study["training"], show_training_images=show
        )
        assert "http://" not in page and "https://" not in page and "//cdn" not in page
        assert not re.search(r"""\b(src|href)\s*=\s*["'](?!data:)""", page)
        (tmp_path / f"page-{show}.html").write_text(f"<!doctype html><html><body>{page}</body></html>")
    assert check_offline(tmp_path) == []


def test_default_page_of_64_pixel_images_stays_under_5_mb():
    # Worst case: incompressible noise, and every shown picture different. Synthetic image i mixes
    # slice 2 of subject 2i (its best match, whose neighbours are slices 0-4) with slices 0 and 4 of
    # that subject and 1 and 3 of subject 2i + 1 (its other matches): 8 distinct pictures per image.
    rng = np.random.default_rng(0)
    n_subjects, n_slices, cap = 2 * DEFAULT_MAX_IMAGES, 5, DEFAULT_MAX_IMAGES
    images = rng.integers(0, 256, (n_subjects, n_slices, 1, 64, 64), dtype=np.uint8)
    names = tuple(f"S{s:03d}/z{z:03d}" for s in range(n_subjects) for z in range(n_slices))
    training = ImageSet(
        images.reshape(-1, 1, 64, 64), names, np.repeat(np.arange(n_subjects), n_slices), ("gray",)
    )
    mix = images.astype(np.float64)
    mix = 0.6 * mix[0::2, 2] + 0.2 * (mix[0::2, 0] + mix[0::2, 4] + mix[1::2, 1] + mix[1::2, 3])
    synthetic = np.clip(np.rint(mix), 0, 255).astype(np.uint8)
    holdout = ImageSet(
        rng.integers(0, 256, (20, 1, 64, 64), dtype=np.uint8),
        tuple(f"H{i:02d}/z000" for i in range(20)),
        np.arange(1000, 1020),
        ("gray",),
    )
    report = memorization_report(synthetic, training, holdout, k=5)
    page = match_browser_html(report, synthetic, training)
    assert len(page_data(page)["items"]) == cap
    assert len(URI.findall(page)) == 8 * cap  # the worst case really is one
    assert len(page.encode()) < 5 * 2**20


PROBE = """<script>
window.__errors = [];
window.addEventListener("error", (e) => window.__errors.push(String(e.message)));
window.addEventListener("load", () => setTimeout(() => {
  const root = document.querySelector(".msb");
  const state = () => ({
    index: root.querySelector(".msb-syn-img").dataset.index,
    src: root.querySelector(".msb-syn-img").src.length,
    r: root.querySelector(".msb-r").textContent,
    matches: [...root.querySelectorAll(".msb-matches figure")].length,
    neighbours: [...root.querySelectorAll(".msb-neighbours figure")].length,
    position: root.querySelector(".msb-pos").textContent,
  });
  const seen = {first: state()};
  const slider = root.querySelector(".msb-slider");
  slider.value = "3";
  slider.dispatchEvent(new Event("input", {bubbles: true}));
  seen.slider = state();
  root.querySelector(".msb-next").dispatchEvent(new MouseEvent("click", {bubbles: true}));
  seen.next = state();
  root.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowLeft", bubbles: true}));
  seen.key = state();
  seen.errors = window.__errors;
  document.body.dataset.probe = JSON.stringify(seen);
}, 300));
</script></body>"""


@pytest.mark.slow
def test_controls_step_through_images_in_headless_chromium(study, tmp_path):
    report = study["report"]
    page = match_browser_html(report, study["synthetic"], study["training"], k=3)
    probe = tmp_path / "probe.html"
    probe.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'></head><body>{page}</body></html>".replace(
            "</body>", PROBE
        )
    )
    seen = probe_in_chromium(probe, tmp_path / "profile", budget_ms=5000)
    assert seen["errors"] == []
    items = page_data(page)["items"]  # the page starts in this order (max r, highest first)
    for step, position in (("first", 0), ("slider", 3), ("next", 4), ("key", 3)):
        i = items[position]["index"]
        assert seen[step]["index"] == str(i), step
        assert seen[step]["r"].startswith(f"max r = {items[position]['max_r']:.4f}"), step
        assert items[position]["max_r"] == pytest.approx(report.max_r[i], abs=5e-7)
        assert seen[step]["position"] == f"{position + 1} / {len(items)}"
        assert seen[step]["matches"] == 3 and seen[step]["neighbours"] >= 3
    assert seen["first"]["r"] != seen["next"]["r"] and seen["first"]["src"] > 0
