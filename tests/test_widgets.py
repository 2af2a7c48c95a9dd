"""The live explorer, driven from Python: shown matches against a float64 Pearson reference, uploads,
held-out baseline, privacy, and reopening a run's training set."""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import float64_pearson
from lab_server import api, jupyterlab
from PIL import Image

from memstudy.data import ImageSet
from memstudy.models import train
from memstudy.models.runs import sample_dir
from memstudy.widgets import explore_run, run_training_set

SIZE = 16
TILE = re.compile(r'class="[^"]*msb-match[^"]*" data-index="(\d+)" data-r="([^"]+)"')
URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")
# Matches carry r as the engine stores it: the exact r rounded once to float32, an absolute error of
# at most 2^-25 ≈ 3e-8 for |r| <= 1; the float64 reference is good to ~1e-15.
R_TOL = 1e-7


def smooth_set(seed: int, n_subjects: int, n_slices: int, first_group: int) -> ImageSet:
    """Two-channel 16×16 images of smooth random volumes sliced along z, names ``S007/z003``."""
    rng = np.random.default_rng(seed)
    images, names, groups = [], [], []
    for s in range(n_subjects):
        noise = rng.standard_normal((2, n_slices + 4, SIZE + 4, SIZE + 4))
        kernel = np.ones(3) / 3  # a 3-tap box blur along each axis: adjacent slices and pixels alike
        for axis in (1, 2, 3):
            noise = np.apply_along_axis(np.convolve, axis, noise, kernel, mode="same")
        volume = np.clip(np.rint(128 + 50 * noise / noise.std()), 0, 255)[:, 2:-2, 2:-2, 2:-2]
        for z in range(n_slices):
            images.append(volume[:, z])
            names.append(f"S{first_group + s:03d}/z{z:03d}")
            groups.append(first_group + s)
    return ImageSet(np.stack(images).astype(np.uint8), tuple(names), np.array(groups), ("a", "b"))


def expected_topk(r: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    order = np.argsort(-r, kind="stable")[:k]
    return order.tolist(), r[order]


def shown_matches(explorer) -> tuple[list[int], np.ndarray]:
    found = TILE.findall(explorer.panel.value)
    return [int(i) for i, _ in found], np.array([float(r) for _, r in found])


def png_bytes(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(explorer, content: bytes, name: str = "query.png") -> None:
    explorer.controls["upload"].value = (
        {
            "name": name,
            "type": "image/png",
            "size": len(content),
            "content": memoryview(content),
            "last_modified": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        },
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A real run folder (a tiny DDPM trained one step) with one sample set of planted images."""
    import torch

    root = tmp_path_factory.mktemp("explorer")
    made = smooth_set(0, 6, 4, 0)
    # As a prepared dataset records it: params.json then names the folder the run's images are in.
    folder = root / "training"
    ImageSet(made.images, made.names, made.groups, made.channels, {"cache_dir": str(folder)}).save(folder)
    training = ImageSet.load(folder)
    holdout = smooth_set(1, 4, 4, 100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        options = {"base_channels": 8, "channel_mult": (1, 2)}
        train(
            "ddpm", training, "tiny", root / "run", steps=1, seed=0, batch_size=2, progress=False, **options
        )
    finally:
        torch.set_num_threads(threads)
    unseen = smooth_set(2, 2, 1, 200).images
    synthetic = np.stack(
        [
            training.images[5],  # 0: an exact copy
            training.images[9][..., ::-1],  # 1: a mirrored copy
            unseen[0],  # 2, 3: images of no training subject
            unseen[1],
        ]
    )
    samples = ImageSet(synthetic, tuple(f"sample{i}" for i in range(4)), np.arange(4), training.channels)
    samples.save(sample_dir(root / "run", 1, 0))
    return {"dir": root / "run", "training": training, "holdout": holdout, "synthetic": synthetic}


@pytest.mark.parametrize(("index", "k", "channel"), [(0, 3, "all"), (2, 5, "all"), (3, 7, "b"), (1, 4, "a")])
def test_shown_matches_are_the_exact_top_k(run, index, k, channel):
    explorer = explore_run(run["dir"], training=run["training"])
    explorer.controls["index"].value = index
    explorer.controls["k"].value = k
    explorer.controls["channel"].value = channel
    query, train_images = run["synthetic"][index], run["training"].images
    if channel != "all":
        c = run["training"].channels.index(channel)
        query, train_images = query[c], train_images[:, c]
    indices, values = expected_topk(float64_pearson(query[None], train_images)[0], k)
    shown_indices, shown_values = shown_matches(explorer)
    assert shown_indices == indices
    np.testing.assert_allclose(shown_values, values, rtol=0, atol=R_TOL)
    assert explorer.message.value == ""


def test_slider_and_index_box_move_together(run):
    explorer = explore_run(run["dir"], training=run["training"])
    assert explorer.controls["index"].max == len(run["synthetic"]) - 1
    explorer.controls["index_text"].value = 2
    assert explorer.controls["index"].value == 2
    assert "synthetic #2 (step_00000001-seed0)" in explorer.panel.value
    assert shown_matches(explorer)[0][0] == int(
        np.argmax(float64_pearson(run["synthetic"][2][None], run["training"].images)[0])
    )


def test_mirror_switch_finds_the_mirrored_copy(run):
    explorer = explore_run(run["dir"], training=run["training"], k=2)
    explorer.controls["index"].value = 1
    zero_lag = float64_pearson(run["synthetic"][1][None], run["training"].images)[0]
    mirrored = float64_pearson(run["synthetic"][1][None, ..., ::-1], run["training"].images)[0]
    assert shown_matches(explorer)[0][0] == int(np.argmax(zero_lag))
    assert mirrored.max() > zero_lag.max() + 0.05  # the switch must change what is found
    explorer.controls["mirror"].value = True
    indices, values = shown_matches(explorer)
    assert indices[0] == int(np.argmax(mirrored))
    assert abs(values[0] - mirrored.max()) <= R_TOL
    assert "(mirror)" in explorer.panel.value


def test_uploaded_png_is_matched_on_the_chosen_channel(run):
    explorer = explore_run(run["dir"], training=run["training"], channel="b")
    picture = np.ascontiguousarray(run["training"].images[17, 1])
    upload(explorer, png_bytes(picture))
    assert explorer.controls["source"].value == "upload"
    indices, values = expected_topk(float64_pearson(picture[None], run["training"].images[:, 1])[0], 5)
    shown_indices, shown_values = shown_matches(explorer)
    assert shown_indices == indices and indices[0] == 17
    np.testing.assert_allclose(shown_values, values, rtol=0, atol=R_TOL)
    assert "upload query.png" in explorer.panel.value


@pytest.mark.parametrize(
    ("content", "channel", "expected"),
    [
        (
            png_bytes(np.zeros((8, 12), np.uint8)),
            "a",
            "small.png is 12×8 pixels; the training images are 16×16",
        ),
        (b"not an image at all", "a", "small.png: cannot read the image"),
        (png_bytes(np.zeros((SIZE, SIZE), np.uint8)), "all", "training images have 2 channels"),
    ],
)
def test_a_bad_upload_shows_a_clear_message(run, content, channel, expected):
    explorer = explore_run(run["dir"], training=run["training"], channel=channel)
    upload(explorer, content, "small.png")
    assert expected in html.unescape(explorer.message.value)
    assert explorer.panel.value == ""
    explorer.controls["source"].value = "sample"  # the explorer recovers
    assert explorer.message.value == "" and TILE.search(explorer.panel.value)


def test_max_r_is_placed_against_the_held_out_baseline(run):
    groups = run["training"].groups

    def max_r_and_margin(image):
        r = float64_pearson(image[None], run["training"].images)[0]
        best = int(np.argmax(r))
        return r[best], r[best] - r[groups != groups[best]].max()

    explorer = explore_run(run["dir"], training=run["training"], holdout=run["holdout"])
    held = np.array([max_r_and_margin(image) for image in run["holdout"].images])
    threshold, margin_threshold = np.quantile(held, 0.99, axis=0)
    calls = []
    for index in range(len(run["synthetic"])):
        explorer.controls["index"].value = index
        max_r, margin = max_r_and_margin(run["synthetic"][index])
        text = html.unescape(explorer.panel.value)
        assert f"at or above {100 * np.mean(held[:, 0] <= max_r):.1f} % of held-out images' max r" in text
        assert f"(threshold {threshold:.4f})" in text and f"(threshold {margin_threshold:.4f})" in text
        calls.append("likely copy" in text)
        assert calls[-1] == (max_r > threshold and margin > margin_threshold)
    assert calls[0] and not all(calls)  # the exact copy is called, and the check can tell


def test_hidden_training_images_leave_no_training_pixels(run):
    views = {run["training"].images[j, c].tobytes() for j in range(len(run["training"])) for c in (0, 1)}

    def leaked(explorer) -> int:
        pictures = [
            np.asarray(Image.open(io.BytesIO(base64.b64decode(uri)))).tobytes()
            for uri in URI.findall(explorer.panel.value)
        ]
        return sum(p in views for p in pictures)

    for show in (True, False):
        explorer = explore_run(run["dir"], training=run["training"], show_training_images=show)
        for index in (2, 3):  # unseen images: any training picture in the panel is a leak
            explorer.controls["index"].value = index
            for channel in ("all", "b"):
                explorer.controls["channel"].value = channel
                assert (leaked(explorer) > 0) == show  # the check finds training pixels when they are there
                names = [run["training"].names[j] for j in shown_matches(explorer)[0]]
                assert names and all(name in explorer.panel.value for name in names)
    assert "show_training_images=False" in explorer.panel.value


def test_the_run_reopens_its_training_set_and_refuses_others(run, tmp_path):
    reopened = run_training_set(run["dir"])
    np.testing.assert_array_equal(reopened.images, run["training"].images)
    assert reopened.names == run["training"].names
    with pytest.raises(ValueError, match="not the images the run trained on"):
        explore_run(run["dir"], training=smooth_set(3, 6, 4, 0))
    params = json.loads((run["dir"] / "params.json").read_text())
    params["dataset"]["provenance"]["cache_dir"] = str(tmp_path / "gone")
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(FileNotFoundError, match="pass training="):
        run_training_set(tmp_path)


@pytest.mark.slow
def test_jupyterlab_serves_the_notebooks_with_the_project_kernel(jupyter_kernel, tmp_path):
    # What `make lab` starts, on 127.0.0.1 with a token; the browser UI is driven in
    # tests/test_live_explorer.py.
    pytest.importorskip("jupyterlab")
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    with jupyterlab(notebooks, tmp_path / "jupyter") as base:
        status = api(base, "/api/status")
        assert status["kernels"] == 0 and "started" in status
        assert jupyter_kernel in api(base, "/api/kernelspecs")["kernelspecs"]
        listed = {item["name"] for item in api(base, "/api/contents")["content"]}
        assert {p.name for p in notebooks.glob("*.ipynb")} <= listed
        with pytest.raises(urllib.error.HTTPError) as refused:  # the token is required
            urllib.request.urlopen(f"{base}/api/contents", timeout=5)
        assert refused.value.code == 403
