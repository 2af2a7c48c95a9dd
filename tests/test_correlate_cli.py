"""``memstudy correlate`` on the authors' layout (folders of PNG files) and ``memstudy bench correlate``."""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.stats import pearsonr

import memstudy.data.datasets
from memstudy.correlate import bench
from memstudy.correlate.backend_int8 import int8_matmul_available
from memstudy.correlate.command import add_bench_correlate_command, add_correlate_command
from memstudy.data import ImageSet


def run(argv: list[str]) -> int:
    """Parse and run like ``memstudy``, with only the correlate commands registered."""
    parser = argparse.ArgumentParser(prog="memstudy")
    commands = parser.add_subparsers(dest="command", required=True)
    add_correlate_command(commands)
    benches = commands.add_parser("bench").add_subparsers(dest="bench", required=True)
    add_bench_correlate_command(benches)
    args = parser.parse_args(argv)
    return args.func(args)


def smooth_images(rng: np.random.Generator, n: int, side: int = 32) -> np.ndarray:
    fields = gaussian_filter(rng.standard_normal((n, side, side)), (0, 2, 2))
    fields /= fields.std(axis=(1, 2), keepdims=True)
    return np.clip(fields * 30 + rng.uniform(60, 180, (n, 1, 1)), 0, 255).astype(np.uint8)


@pytest.fixture
def folders(tmp_path):
    """The authors' layout: a folder of synthetic and a folder of training PNG files, one image each."""
    rng = np.random.default_rng(0)
    training = smooth_images(rng, 25)
    synthetic = smooth_images(rng, 6)
    synthetic[1] = np.clip(training[17] * 0.9 + 12 + rng.normal(0, 1, (32, 32)), 0, 255).astype(np.uint8)
    synthetic[4] = training[3]
    for name, images in (("synthetic", synthetic), ("training", training)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / name / f"{name[:5]}_{i:03d}.png")
    # macOS debris that must be ignored, as in the Kaggle archives
    (tmp_path / "training" / "._train_000.png").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "training" / ".DS_Store").write_bytes(b"junk")
    # One training image as an RGB JPEG: read as luminance
    Image.fromarray(np.repeat(training[20][..., None], 3, axis=2)).save(
        tmp_path / "training" / "train_020.jpeg"
    )
    (tmp_path / "training" / "train_020.png").unlink()
    return tmp_path / "synthetic", tmp_path / "training"


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def brute_force_top1(synthetic_folder, training_folder) -> dict[str, tuple[str, float]]:
    """The authors' double loop: read both files for every pair, flatten, pearsonr, keep the maximum."""

    def read(path):
        with Image.open(path) as image:
            return np.asarray(image.convert("L"), dtype=np.float64).ravel()

    training_files = sorted(p for p in training_folder.iterdir() if not p.name.startswith("."))
    result = {}
    for s in sorted(synthetic_folder.iterdir()):
        r = [pearsonr(read(t), read(s))[0] for t in training_files]
        best = int(np.argmax(r))
        result[s.name] = (training_files[best].name, r[best])
    return result


def test_png_folders_give_the_brute_force_pearsonr_top1(folders, tmp_path, capsys):
    synthetic, training = folders
    out = tmp_path / "matches.csv"

    status = run(["correlate", str(synthetic), str(training), "--out", str(out), "--no-progress"])

    rows = read_csv(out)
    expected = brute_force_top1(synthetic, training)
    assert status == 0
    assert list(rows[0]) == ["synthetic", "training", "correlation"]
    assert [row["synthetic"] for row in rows] == sorted(expected)
    for row in rows:
        name, r = expected[row["synthetic"]]
        assert row["training"] == name
        assert float(row["correlation"]) == pytest.approx(r, abs=1e-5)
    by_name = {row["synthetic"]: row for row in rows}
    assert by_name["synth_001.png"]["training"] == "train_017.png"
    assert by_name["synth_004.png"]["training"] == "train_003.png"
    backend = "int8" if int8_matmul_available() else "numpy"  # what auto runs for 8-bit images
    assert f"({backend}); wrote" in capsys.readouterr().out


def test_top_k_writes_k_ranked_rows_per_synthetic_image(folders, tmp_path):
    synthetic, training = folders
    out = tmp_path / "top3.csv"

    run(
        [
            "correlate",
            str(synthetic),
            str(training),
            "-k",
            "3",
            "-o",
            str(out),
            "--npz",
            str(tmp_path / "m.npz"),
        ]
    )

    rows = read_csv(out)
    assert list(rows[0]) == ["synthetic", "training", "correlation", "rank"]
    assert len(rows) == 6 * 3
    for i in range(6):
        group = rows[3 * i : 3 * i + 3]
        assert [row["rank"] for row in group] == ["1", "2", "3"]
        assert len({row["synthetic"] for row in group}) == 1
        r = [float(row["correlation"]) for row in group]
        assert r == sorted(r, reverse=True)
    assert np.load(tmp_path / "m.npz")["indices"].shape == (6, 3)


def test_unreadable_or_differently_sized_files_are_errors_or_skipped(folders, tmp_path, capsys):
    synthetic, training = folders
    (training / "train_900.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    Image.fromarray(np.zeros((40, 32), dtype=np.uint8)).save(training / "train_901.png")
    out = tmp_path / "matches.csv"

    with pytest.raises(ValueError, match=r"train_900\.png: cannot be read .*--on-error skip"):
        run(["correlate", str(synthetic), str(training), "-o", str(out)])
    assert not out.exists()
    run(["correlate", str(synthetic), str(training), "-o", str(out), "--on-error", "skip"])

    printed = capsys.readouterr().out
    assert "skipped TRAIN train_900.png: cannot be read" in printed
    assert "skipped TRAIN train_901.png: size 32×40 differs from 32×32" in printed
    assert {row["training"] for row in read_csv(out)}.isdisjoint({"train_900.png", "train_901.png"})


def test_exclude_self_on_one_folder_never_matches_an_image_with_itself(folders, tmp_path):
    _, training = folders
    out = tmp_path / "baseline.csv"

    run(["correlate", str(training), str(training), "-o", str(out), "--exclude", "self"])

    rows = read_csv(out)
    assert len(rows) == 25
    assert all(row["synthetic"] != row["training"] for row in rows)


def test_npy_file_and_dataset_name_inputs(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 2, 16, 16), dtype=np.uint8)
    names = tuple(f"subject{i // 4}/z{i % 4:03d}" for i in range(12))
    dataset = ImageSet(images, names, np.arange(12) // 4, ("t1", "flair"))
    monkeypatch.setattr(memstudy.data.datasets, "load_dataset", lambda name, root=None, **options: dataset)
    np.save(tmp_path / "samples.npy", images[[5, 2]])  # the same (N, C, H, W) layout
    out = tmp_path / "matches.csv"

    run(["correlate", str(tmp_path / "samples.npy"), "tiny-phantom", "--channel", "flair", "-o", str(out)])

    rows = read_csv(out)
    assert [(row["synthetic"], row["training"]) for row in rows] == [("0", names[5]), ("1", names[2])]
    assert all(math.isclose(float(row["correlation"]), 1.0, abs_tol=1e-6) for row in rows)


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"SYNTH: .*nowhere\.npy does not exist"):
        run(["correlate", str(tmp_path / "nowhere.npy"), str(tmp_path)])


def test_bench_prints_one_json_object_with_the_ratios(monkeypatch, capsys):
    real = bench.run_benchmark

    def tiny(**options):
        options.update(
            size=32,
            n_synthetic=64,
            n_training=160,
            k=3,
            repeats=1,
            loop_images=3,
            out_of_core_mb=12,
            out_of_core_chunk_mb=2,
            sgemm_size=512,
            gpu=False,
        )
        return real(**options)

    monkeypatch.setattr(bench, "run_benchmark", tiny)

    assert run(["bench", "correlate", "--json"]) == 0

    results = json.loads(capsys.readouterr().out)
    for key in ("sgemm_fraction", "vs_faiss", "vs_pearsonr_loop", "out_of_core_peak_rss_mb"):
        assert math.isfinite(results[key]) and results[key] > 0, key
    assert results["faiss_top1_agreement"] == 1.0
    assert results["vs_pearsonr_loop"] > results["vs_pearsonr_compute_only"] > 1
    ooc = results["out_of_core"]
    assert ooc["file_mb"] > 5 * ooc["chunk_mb"]
    assert ooc["peak_rss_mb"] - ooc["baseline_rss_mb"] < ooc["file_mb"]
    assert "faiss IndexFlatIP" in bench.format_report(results)
