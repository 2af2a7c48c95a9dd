"""Shared fixtures: tiny copies of the real data layouts, written at test time."""

from __future__ import annotations

import html
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

TINY_SHAPE = (24, 24, 12)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """Give every test its own empty data cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("MEMSTUDY_CACHE", str(cache))
    return cache


def brats_volumes(shape: tuple[int, int, int], seed: int) -> dict[str, np.ndarray]:
    """Volumes of a made-up subject: a bright ellipsoid 'brain' whose size varies along z, and a tumour."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    radius = 0.2 + 0.8 * np.linspace(0, 1, shape[2])[None, None, :]  # bigger brain towards the top
    brain = (x**2 + y**2) < radius**2
    base = rng.uniform(200, 400) * brain * (1 + 0.2 * rng.standard_normal(shape))
    volumes = {
        seq: np.clip(base * gain, 0, None).astype(np.int16)
        for seq, gain in (("t1", 1.0), ("t2", 1.5), ("flair", 0.8), ("t1ce", 1.2))
    }
    seg = np.zeros(shape, np.uint8)
    cx, cy = rng.integers(shape[0] // 3, 2 * shape[0] // 3, size=2)
    seg[cx - 2 : cx + 2, cy - 2 : cy + 2, shape[2] // 2 :] = 2
    seg[cx - 1 : cx + 1, cy - 1 : cy + 1, shape[2] // 2 :] = 4
    seg[cx, cy, shape[2] // 2 :] = 1
    volumes["seg"] = seg
    return volumes


def write_subject(folder: Path, shape=TINY_SHAPE, seed=0, suffix=".nii", seg_name=None) -> dict[str, Path]:
    """Write one subject's five sequences in the BraTS naming scheme; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for seq, volume in brats_volumes(shape, seed).items():
        name = seg_name if seq == "seg" and seg_name else f"{folder.name}_{seq}{suffix}"
        paths[seq] = folder / name
        nib.save(nib.Nifti1Image(volume, np.diag([-1.0, -1.0, 1.0, 1.0])), paths[seq])
    return paths


@pytest.fixture
def brats20_root(tmp_path) -> Path:
    """A Kaggle-style BraTS 2020 copy: subjects nested two folders down, uncompressed .nii."""
    root = tmp_path / "kaggle"
    subjects = root / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData"
    for i in range(1, 7):
        write_subject(subjects / f"BraTS20_Training_{i:03d}", seed=i)
    (subjects / "name_mapping.csv").write_text("BraTS_2020_subject_ID\n")
    return root


@pytest.fixture
def brats21_root(tmp_path) -> Path:
    """A BraTS 2021 copy: subject folders directly under the root, gzipped .nii.gz."""
    root = tmp_path / "brats21"
    for i in (0, 2, 5):
        write_subject(root / f"BraTS2021_{i:05d}", seed=100 + i, suffix=".nii.gz")
    return root


def write_xray(path: Path, size: tuple[int, int], seed: int, mode: str = "L") -> None:
    """A smooth random picture (JPEG keeps it nearly intact) of the given (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    a, b = rng.uniform(0.005, 0.03, size=2)
    picture = (127 + 100 * np.sin(a * xx + rng.uniform(0, 6)) * np.cos(b * yy)).astype(np.uint8)
    image = Image.fromarray(picture)
    path.parent.mkdir(parents=True, exist_ok=True)
    (image.convert("RGB") if mode == "RGB" else image).save(path, quality=95)


@pytest.fixture
def kermany_root(tmp_path) -> Path:
    """A Kermany layout with the zip's clutter: __MACOSX, ._ files, .DS_Store, nested copy."""
    root = tmp_path / "cxr"
    base = root / "chest_xray"
    sizes = [(120, 90), (90, 130), (100, 100)]
    for s, split in enumerate(("train", "val", "test")):
        for c, (label, names) in enumerate(
            (
                ("NORMAL", ["IM-0001-0001.jpeg", "IM-0001-0002.jpeg", "NORMAL2-IM-0007-0001.jpeg"]),
                (
                    "PNEUMONIA",
                    ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person3_virus_15.jpeg"],
                ),
            )
        ):
            for i, name in enumerate(names):
                mode = "RGB" if i == 2 else "L"
                write_xray(base / split / label / name, sizes[i], seed=100 * s + 10 * c + i, mode=mode)
            (base / split / label / f"._{names[0]}").write_bytes(b"\x00\x05\x16\x07 mac metadata")
            (base / split / label / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    write_xray(base / "chest_xray" / "train" / "NORMAL" / "IM-9999-0001.jpeg", (80, 80), seed=7)
    (root / "__MACOSX" / "chest_xray" / "train" / "NORMAL").mkdir(parents=True)
    (root / "__MACOSX" / "chest_xray" / "train" / "NORMAL" / "._IM-0001-0001.jpeg").write_bytes(b"junk")
    return root


@pytest.fixture(scope="session")
def jupyter_kernel(tmp_path_factory) -> str:
    """Register the `memstudy` kernel for this interpreter in a private Jupyter path.

    `make install` registers it in the venv; doing it here too keeps the tests independent of that.
    """
    import os
    import subprocess
    import sys

    prefix = tmp_path_factory.mktemp("jupyter")
    subprocess.run(
        [sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix), "--name", "memstudy"],
        check=True,
        capture_output=True,
    )
    os.environ["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
    return "memstudy"


@pytest.fixture
def one_torch_thread():
    """Run torch on one thread: tiny models gain nothing from a second, and where other work shares
    the two cores, spin-waiting thread pairs run several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Model sizes small enough for a training step in a few tens of milliseconds on two CPU cores.
TINY_MODEL_OPTIONS = {
    "ddpm": {"base_channels": 8, "channel_mult": (1, 2)},
    "stylegan": {
        "channel_base": 64,
        "channel_max": 16,
        "z_dim": 16,
        "w_dim": 16,
        "r1_interval": 2,
        "pl_weight": 2.0,
        "pl_interval": 3,
    },
}


@pytest.fixture
def tiny_model_options() -> dict[str, dict]:
    """Config overrides that shrink each model's ``tiny`` config to test size, by model name."""
    return {model: dict(options) for model, options in TINY_MODEL_OPTIONS.items()}


@pytest.fixture
def training_images():
    """Six 16×16 two-channel (a, b) images of smooth random blobs, none of them mirror-symmetric."""
    from memstudy.data import ImageSet

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    stack = []
    for _ in range(6):
        cy, cx, r = rng.uniform(4, 12, 3)
        disc = np.clip(1.5 - np.hypot(yy - cy, xx - cx) / r, 0, 1)
        stack.append(np.stack([disc, disc**2]))
    return ImageSet(
        (np.stack(stack) * 255).astype(np.uint8), [f"img{i}" for i in range(6)], range(6), ["a", "b"]
    )


@pytest.fixture
def train_tiny(one_torch_thread):
    """``train_tiny(model, imageset, run_dir, steps, **options)``: train a test-sized model on one thread
    (seed 0, batch 2, no progress bar unless options say otherwise) and return its TrainResult."""
    from memstudy.models import train

    def run(model, imageset, run_dir, steps, **options):
        options = {"seed": 0, "batch_size": 2, "progress": False, **TINY_MODEL_OPTIONS[model], **options}
        return train(model, imageset, "tiny", run_dir, steps=steps, **options)

    return run


@pytest.fixture
def blobs():
    """Four 16×16 one-channel images, one bright disc in a different quadrant each."""
    from memstudy.data import ImageSet

    yy, xx = np.mgrid[:16, :16]
    discs = [np.clip(1.3 - np.hypot(yy - 4 - 8 * (k // 2), xx - 4 - 8 * (k % 2)) / 5, 0, 1) for k in range(4)]
    return ImageSet((np.stack(discs)[:, None] * 255).astype(np.uint8), list("abcd"), range(4), ["x"])


@pytest.fixture
def restore_log_levels():
    """``memstudy.cli.main`` sets logger levels for the process; put them back for the other tests."""
    loggers = [logging.getLogger(), logging.getLogger("memstudy")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


def _trainer_tensors(result) -> dict:
    """Every tensor of a trained run's state (weights, EMA, optimizer moments), flattened by key."""
    import torch

    flat = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict | list):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                walk(f"{prefix}/{k}", v)

    walk("", result.trainer.state_dict())
    return flat


@pytest.fixture
def trainer_tensors():
    """``trainer_tensors(result)``: a train() result's state tensors by key, for exact comparisons."""
    return _trainer_tensors


def float64_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The tests' reference: all-pairs Pearson r in float64 of images flattened whole, shape
    ``(len(a), len(b))``; NaN where either image is constant."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


#: Headless Chromium as a test browser on a machine without network: no background connections.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_or_skip() -> str:
    """The Debian ``chromium`` binary; skip the test where it is missing (CI installs it)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (Debian package `chromium`)")
    return browser


def probe_in_chromium(page: Path, profile: Path, budget_ms: int) -> dict:
    """Load ``page`` (with a probe script that writes JSON into ``body[data-probe]``) offline in headless
    Chromium for ``budget_ms`` of virtual time; return what the probe reported."""
    command = [
        chromium_or_skip(),
        *CHROMIUM_FLAGS,
        "--host-resolver-rules=MAP * ~NOTFOUND",  # any network fetch fails, as on an offline machine
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}",
        "--dump-dom",
        page.as_uri(),
    ]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the probe script did not run"
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory) -> dict:
    """`memstudy study --plan plans/smoke.yaml`, once per session, with its own data cache.

    Returns the plan folder, the command's result and the environment it ran with (reuse it: the
    phantoms are generated into that cache).
    """
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("smoke-study")
    env = {**os.environ, "MEMSTUDY_CACHE": str(root / "cache")}
    plan = Path(__file__).resolve().parents[1] / "plans" / "smoke.yaml"
    command = [sys.executable, "-m", "memstudy.cli", "study", "--plan", str(plan)]
    command += ["--runs-dir", str(root / "runs"), "--cores", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    return {"plan_dir": root / "runs" / "smoke", "result": result, "env": env}
