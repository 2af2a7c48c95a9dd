"""``memstudy correlate`` as a user runs it: folders of PNG files (the authors' layout), .npy files,
prepared dataset names, outputs that are never overwritten silently, scratch space; and
``memstudy bench correlate``.

The command runs in-process through ``memstudy.cli.main``, so exit codes and messages are the
user's. Correlations are compared with ``scipy.stats.pearsonr`` on the files themselves. Tolerance
of r: the CSV prints 6 decimals (±5e-7); values are stored as float32 (±6e-8); the float32 numpy
path adds at most ~sqrt(D)·eps32 ≈ 32 · 6e-8 ≈ 2e-6 for D = 1024 pixels of centred unit-norm
data. 1e-5 covers all of it with margin; a wrong match differs by far more.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import stat

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.stats import pearsonr

from memstudy.cli import main
from memstudy.correlate import bench
from memstudy.correlate import command as correlate_command
from memstudy.correlate.backend_int8 import int8_matmul_available
from memstudy.correlate.folders import read_folder
from memstudy.data import ImageSet

R_TOLERANCE = 1e-5  # see the module docstring


pytestmark = pytest.mark.usefixtures("restore_log_levels")


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``memstudy ARGV`` in-process; return the exit status, stdout and stderr."""
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def smooth_images(rng: np.random.Generator, n: int, side: int = 32) -> np.ndarray:
    fields = gaussian_filter(rng.standard_normal((n, side, side)), (0, 2, 2))
    fields /= fields.std(axis=(1, 2), keepdims=True)
    return np.clip(fields * 30 + rng.uniform(60, 180, (n, 1, 1)), 0, 255).astype(np.uint8)


def write_pngs(folder, images: np.ndarray, prefix: str) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{prefix}_{i:03d}.png")


@pytest.fixture
def folders(tmp_path):
    """The authors' layout: a folder of synthetic and a folder of training PNG files, one image each."""
    rng = np.random.default_rng(0)
    training = smooth_images(rng, 25)
    synthetic = smooth_images(rng, 6)
    synthetic[1] = np.clip(training[17] * 0.9 + 12 + rng.normal(0, 1, (32, 32)), 0, 255).astype(np.uint8)
    synthetic[4] = training[3]
    write_pngs(tmp_path / "synthetic", synthetic, "synth")
    write_pngs(tmp_path / "training", training, "train")
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


def read_pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float64).ravel()


def visible_files(folder) -> list:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def brute_force_top1(synthetic_folder, training_folder, allowed=None) -> dict[str, tuple[str, float]]:
    """The authors' double loop: read both files for every pair, flatten, pearsonr, keep the maximum.

    ``allowed(s, t)`` (file names) leaves pairs out when it returns False.
    """
    training_files = visible_files(training_folder)
    result = {}
    for s in visible_files(synthetic_folder):
        r = [
            pearsonr(read_pixels(t), read_pixels(s))[0]
            if allowed is None or allowed(s.name, t.name)
            else -np.inf
            for t in training_files
        ]
        best = int(np.argmax(r))
        result[s.name] = (training_files[best].name, r[best])
    return result


def assert_rows_match(rows: list[dict[str, str]], expected: dict[str, tuple[str, float]]) -> None:
    assert [row["synthetic"] for row in rows] == sorted(expected)
    for row in rows:
        name, r = expected[row["synthetic"]]
        assert row["training"] == name, row
        assert float(row["correlation"]) == pytest.approx(r, abs=R_TOLERANCE)


def scratch_dirs(folder) -> list:
    return sorted(folder.glob(".memstudy-correlate.*"))


def test_png_folders_give_the_brute_force_pearsonr_top1(folders, tmp_path, capsys):
    synthetic, training = folders
    out = tmp_path / "matches.csv"

    status, printed, _ = run(["correlate", synthetic, training, "--out", out, "--no-progress"], capsys)

    rows = read_csv(out)
    assert status == 0
    assert list(rows[0]) == ["synthetic", "training", "correlation"]
    assert_rows_match(rows, brute_force_top1(synthetic, training))
    by_name = {row["synthetic"]: row for row in rows}
    assert by_name["synth_001.png"]["training"] == "train_017.png"
    assert by_name["synth_004.png"]["training"] == "train_003.png"
    backend = "int8" if int8_matmul_available() else "numpy"  # what auto runs for 8-bit images
    assert f"({backend}); wrote {out}" in printed


def test_top_k_writes_k_ranked_rows_per_synthetic_image(folders, tmp_path, capsys):
    synthetic, training = folders
    out = tmp_path / "top3.csv"

    run(["correlate", synthetic, training, "-k", 3, "-o", out, "--npz", tmp_path / "m.npz"], capsys)

    rows = read_csv(out)
    training_files = visible_files(training)
    assert list(rows[0]) == ["synthetic", "training", "correlation", "rank"]
    assert len(rows) == 6 * 3
    for s, path in enumerate(visible_files(synthetic)):
        r = np.array([pearsonr(read_pixels(t), read_pixels(path))[0] for t in training_files])
        best = np.argsort(-r, kind="stable")[:3]
        group = rows[3 * s : 3 * s + 3]
        assert [row["rank"] for row in group] == ["1", "2", "3"]
        assert {row["synthetic"] for row in group} == {path.name}
        assert [row["training"] for row in group] == [training_files[j].name for j in best]
        assert [float(row["correlation"]) for row in group] == pytest.approx(r[best], abs=R_TOLERANCE)
    assert np.load(tmp_path / "m.npz")["indices"].shape == (6, 3)


def test_npz_named_without_suffix_is_written_where_the_command_says(folders, tmp_path, capsys):
    synthetic, training = folders
    out = tmp_path / "matches.csv"

    status, printed, _ = run(
        ["correlate", synthetic, training, "-k", 2, "-o", out, "--npz", tmp_path / "matches"], capsys
    )

    npz = tmp_path / "matches.npz"
    assert status == 0
    assert f"wrote {out} and {npz}" in printed
    assert not (tmp_path / "matches").exists()
    training_names = [p.name for p in visible_files(training)]
    rows = read_csv(out)
    with np.load(npz) as saved:
        named = [training_names[j] for j in saved["indices"].ravel()]
        values = saved["values"].ravel()
    assert named == [row["training"] for row in rows]
    assert values == pytest.approx([float(row["correlation"]) for row in rows], abs=1e-6)


def test_same_named_folders_larger_than_the_memory_budget_are_not_mixed_up(tmp_path, capsys):
    rng = np.random.default_rng(4)
    synthetic, training = tmp_path / "ddpm" / "images", tmp_path / "train" / "images"
    write_pngs(synthetic, smooth_images(rng, 12), "synth")
    write_pngs(training, smooth_images(rng, 12), "train")
    out = tmp_path / "matches.csv"

    # 12 images of 32×32 are 12 KiB: more than a 5 KiB budget, so both are decoded to scratch files.
    status, _, _ = run(["correlate", synthetic, training, "-o", out, "--chunk-mb", 0.005], capsys)

    assert status == 0
    assert_rows_match(read_csv(out), brute_force_top1(synthetic, training))


def test_read_folder_gives_each_folder_its_own_scratch_file(tmp_path):
    rng = np.random.default_rng(5)
    first, second = smooth_images(rng, 3), smooth_images(rng, 3)
    write_pngs(tmp_path / "a" / "images", first, "img")
    write_pngs(tmp_path / "b" / "images", second, "img")
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    a = read_folder(tmp_path / "a" / "images", scratch_dir=scratch, max_memory_mb=0)
    b = read_folder(tmp_path / "b" / "images", scratch_dir=scratch, max_memory_mb=0)

    assert isinstance(a.images, np.memmap) and isinstance(b.images, np.memmap)
    np.testing.assert_array_equal(a.images, first)
    np.testing.assert_array_equal(b.images, second)


def test_scratch_files_are_readable_by_others_and_removed_after_the_run(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(6)
    write_pngs(tmp_path / "s", smooth_images(rng, 8), "s")
    write_pngs(tmp_path / "t", smooth_images(rng, 8), "t")
    seen: dict[str, int] = {}
    real_search = correlate_command.topk_pearson

    def search_and_look(*args, **kwargs):
        (scratch,) = scratch_dirs(tmp_path)
        for path in [scratch, *scratch.rglob("*")]:
            seen[str(path.relative_to(tmp_path))] = stat.S_IMODE(path.stat().st_mode)
        return real_search(*args, **kwargs)

    monkeypatch.setattr(correlate_command, "topk_pearson", search_and_look)
    old_umask = os.umask(0o022)
    try:
        status, _, _ = run(
            ["correlate", tmp_path / "s", tmp_path / "t", "-o", tmp_path / "m.csv", "--chunk-mb", 0.004],
            capsys,
        )
    finally:
        os.umask(old_umask)

    assert status == 0
    files = {path: mode for path, mode in seen.items() if path.endswith(".npy")}
    folders = {path: mode for path, mode in seen.items() if not path.endswith(".npy")}
    assert len(files) == 2 and set(files.values()) == {0o644}, seen
    assert folders and set(folders.values()) == {0o755}, seen
    assert scratch_dirs(tmp_path) == []


def test_scratch_is_removed_when_the_search_fails(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(7)
    write_pngs(tmp_path / "s", smooth_images(rng, 4), "s")

    def fail(*args, **kwargs):
        raise ValueError("synthetic image 2 contains NaN or Inf")

    monkeypatch.setattr(correlate_command, "topk_pearson", fail)

    status, _, err = run(
        ["correlate", tmp_path / "s", tmp_path / "s", "-o", tmp_path / "m.csv", "--chunk-mb", 0.001], capsys
    )

    assert status == 2 and "contains NaN" in err
    assert scratch_dirs(tmp_path) == [] and not (tmp_path / "m.csv").exists()


@pytest.mark.parametrize("existing", ["csv", "npz"])
def test_an_existing_output_is_refused_without_force(folders, tmp_path, capsys, existing):
    synthetic, training = folders
    out, npz = tmp_path / "matches.csv", tmp_path / "matches.npz"
    kept = out if existing == "csv" else npz
    kept.write_text("results of an earlier run\n")
    argv = ["correlate", synthetic, training, "-o", out, "--npz", tmp_path / "matches"]

    status, _, err = run(argv, capsys)

    assert status == 2
    assert err.strip() == f"memstudy correlate: error: {kept} exists; use --force to overwrite it"
    assert kept.read_text() == "results of an earlier run\n"
    assert not (npz if existing == "csv" else out).exists()

    assert run([*argv, "--force"], capsys)[0] == 0
    assert [row["synthetic"] for row in read_csv(out)] == [p.name for p in visible_files(synthetic)]
    assert np.load(npz)["indices"].shape == (6, 1)


def test_unreadable_or_differently_sized_files_are_errors_or_skipped(folders, tmp_path, capsys):
    synthetic, training = folders
    (training / "train_900.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    Image.fromarray(np.zeros((40, 32), dtype=np.uint8)).save(training / "train_901.png")
    out = tmp_path / "matches.csv"

    status, _, err = run(["correlate", synthetic, training, "-o", out], capsys)

    assert status == 2 and len(err.splitlines()) == 1
    assert f"{training / 'train_900.png'}: cannot read the image" in err and "--on-error skip" in err
    assert not out.exists()
    status, printed, _ = run(["correlate", synthetic, training, "-o", out, "--on-error", "skip"], capsys)
    assert status == 0
    assert "skipped TRAIN train_900.png: cannot read the image" in printed
    assert "skipped TRAIN train_901.png: size 32×40 differs from 32×32" in printed
    assert {row["training"] for row in read_csv(out)}.isdisjoint({"train_900.png", "train_901.png"})


def test_sixteen_bit_images_are_refused_by_folders_and_chest_x_rays_alike(tmp_path, capsys):
    from memstudy.data.chestxray import read_xray

    folder = tmp_path / "deep"
    folder.mkdir()
    wide = folder / "wide.png"
    Image.fromarray(np.full((16, 16), 4000, dtype=np.uint16)).save(wide)
    message = f"{wide}: mode I;16 (more than 8 bits per pixel) is not supported; expected 8-bit"

    status, _, err = run(["correlate", folder, folder, "-o", tmp_path / "m.csv"], capsys)

    assert status == 2 and message in err
    with pytest.raises(ValueError, match=re.escape(message)):
        read_xray(wide, 8)


def test_exclude_self_on_one_folder_never_matches_an_image_with_itself(folders, tmp_path, capsys):
    _, training = folders
    out = tmp_path / "baseline.csv"

    run(["correlate", training, training, "-o", out, "--exclude", "self"], capsys)

    assert_rows_match(read_csv(out), brute_force_top1(training, training, lambda s, t: s != t))


@pytest.fixture
def subjects(tmp_path):
    """Four subjects of three slices each as PNG files: slices of a subject are much alike."""
    rng = np.random.default_rng(8)
    base = smooth_images(rng, 4)
    slices = np.stack([base[i // 3] + rng.integers(0, 20, (32, 32), dtype=np.uint8) for i in range(12)])
    folder = tmp_path / "slices"
    write_pngs(folder, slices, "img")
    subject = {f"img_{i:03d}.png": f"subject{i // 3}" for i in range(12)}
    return folder, subject, slices


def test_exclude_group_on_image_folders_takes_the_groups_from_a_file(subjects, tmp_path, capsys):
    folder, subject, _ = subjects
    groups = tmp_path / "groups.csv"
    groups.write_text("name,group\n" + "".join(f"{name},{s}\n" for name, s in subject.items()))
    out = tmp_path / "baseline.csv"

    status, _, _ = run(
        ["correlate", folder, folder, "-o", out, "--exclude", "group", "--groups", groups], capsys
    )

    assert status == 0
    other_subject = brute_force_top1(folder, folder, lambda s, t: subject[s] != subject[t])
    assert_rows_match(read_csv(out), other_subject)


def test_exclude_group_without_groups_says_what_the_command_needs(subjects, tmp_path, capsys):
    folder, _, _ = subjects

    status, _, err = run(
        ["correlate", folder, folder, "-o", tmp_path / "m.csv", "--exclude", "group"], capsys
    )

    assert status == 2 and len(err.splitlines()) == 1
    assert "--groups FILE" in err and "Exclude(" not in err


def test_slice_distance_on_a_npy_file_uses_the_positions_of_the_groups_file(subjects, tmp_path, capsys):
    _, _, slices = subjects
    np.save(tmp_path / "slices.npy", slices)
    group = np.arange(12) // 3
    position = np.array([10, 11, 13] * 4)  # 11 and 13 are 2 apart: not left out at distance 1
    (tmp_path / "groups.csv").write_text("".join(f"{i},s{group[i]},{position[i]}\n" for i in range(12)))
    out = tmp_path / "m.csv"

    status, _, _ = run(
        [
            "correlate",
            tmp_path / "slices.npy",
            tmp_path / "slices.npy",
            "-o",
            out,
            "--slice-distance",
            1,
            "--groups",
            tmp_path / "groups.csv",
        ],
        capsys,
    )

    assert status == 0
    flat = slices.reshape(12, -1).astype(np.float64)
    expected = {}
    for i in range(12):
        left_out = (group == group[i]) & (np.abs(position - position[i]) <= 1)
        r = [-np.inf if left_out[j] else pearsonr(flat[i], flat[j])[0] for j in range(12)]
        expected[str(i)] = (str(int(np.argmax(r))), max(r))
    rows = read_csv(out)
    assert [row["synthetic"] for row in rows] == [str(i) for i in range(12)]
    for row in rows:
        name, r = expected[row["synthetic"]]
        assert row["training"] == name and float(row["correlation"]) == pytest.approx(r, abs=R_TOLERANCE)


def prepare_small_brats(root, capsys) -> ImageSet:
    """``memstudy data prepare brats20`` with small options; return the cached ImageSet it made."""
    status, printed, _ = run(
        ["data", "prepare", "brats20", "--root", root, "--pad-to", 32, "--option", "size=16"], capsys
    )
    assert status == 0
    return ImageSet.load(printed.rsplit("cached in ", 1)[1].strip())


def test_dataset_name_opens_the_cache_that_data_prepare_made(
    brats20_root, tmp_path, capsys, monkeypatch, isolated_cache
):
    import nibabel

    prepared = prepare_small_brats(brats20_root, capsys)
    np.save(tmp_path / "samples.npy", prepared.images[[7, 3]])  # the same (N, C, H, W) layout

    def no_raw_reads(*args, **kwargs):
        raise AssertionError("the raw NIfTI files were read again")

    monkeypatch.setattr(nibabel, "load", no_raw_reads)
    out = tmp_path / "matches.csv"
    status, _, _ = run(
        [
            "correlate",
            tmp_path / "samples.npy",
            "brats20",
            "--root",
            brats20_root,
            "--data-option",
            "pad_to=32",
            "--data-option",
            "size=16",
            "--channel",
            "flair",
            "-o",
            out,
        ],
        capsys,
    )

    assert status == 0
    rows = read_csv(out)
    assert [(row["synthetic"], row["training"]) for row in rows] == [
        ("0", prepared.names[7]),
        ("1", prepared.names[3]),
    ]
    assert all(math.isclose(float(row["correlation"]), 1.0, abs_tol=R_TOLERANCE) for row in rows)
    assert len(list((isolated_cache / "imagesets").iterdir())) == 1


def test_a_sample_folder_is_correlated_with_a_prepared_dataset_name(brats20_root, tmp_path, capsys):
    # --root/--data-option describe TRAIN (the name); the SYNTH ImageSet folder must not refuse them.
    prepared = prepare_small_brats(brats20_root, capsys)
    prepared.subset([5, 2]).save(tmp_path / "samples")
    out = tmp_path / "matches.csv"
    options = ["--root", brats20_root, "--data-option", "pad_to=32", "--data-option", "size=16"]
    status, _, err = run(["correlate", tmp_path / "samples", "brats20", *options, "-o", out], capsys)

    assert status == 0, err
    assert [row["training"] for row in read_csv(out)] == [prepared.names[5], prepared.names[2]]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--data-option", "sise=16"], "brats20: unknown option 'sise'; it takes "),
        (["--data-option", "size=big"], 'brats20: option size="big": expected an integer or null'),
        (
            ["--data-option", "split=test"],
            "brats20: option split=\"test\": expected one of 'train', 'holdout'",
        ),
        ([], "TRAIN: brats20 needs --root"),
    ],
)
def test_bad_dataset_options_are_one_line_errors(tmp_path, capsys, brats20_root, options, message):
    np.save(tmp_path / "samples.npy", np.zeros((2, 5, 16, 16), np.uint8))
    root = ["--root", brats20_root] if options else []

    status, _, err = run(
        ["correlate", tmp_path / "samples.npy", "brats20", *root, *options, "-o", tmp_path / "m.csv"], capsys
    )

    assert status == 2 and len(err.splitlines()) == 1 and message in err, err


def test_data_options_without_a_dataset_name_are_refused(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((2, 8, 8), np.uint8))

    status, _, err = run(
        [
            "correlate",
            tmp_path / "a.npy",
            tmp_path / "a.npy",
            "--data-option",
            "size=8",
            "-o",
            tmp_path / "m",
        ],
        capsys,
    )

    assert status == 2 and "apply to dataset names; neither SYNTH nor TRAIN is one" in err


def test_a_channel_name_for_npy_files_is_a_one_line_error(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.random.default_rng(9).integers(0, 255, (3, 2, 8, 8), dtype=np.uint8))

    status, _, err = run(
        ["correlate", tmp_path / "a.npy", tmp_path / "a.npy", "--channel", "flair", "-o", tmp_path / "m"],
        capsys,
    )

    assert status == 2 and len(err.splitlines()) == 1 and "give an index" in err


@pytest.mark.slow
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

    status, printed, _ = run(["bench", "correlate", "--json"], capsys)

    # Speed itself is what `memstudy bench` reports, not something a unit test can assert.
    results = json.loads(printed)
    assert status == 0
    for key in ("sgemm_fraction", "vs_faiss", "vs_pearsonr_loop", "out_of_core_peak_rss_mb"):
        assert isinstance(results[key], float) and math.isfinite(results[key]), key
    assert results["faiss_top1_agreement"] == 1.0
    assert set(results["float32_parts"]) == {"standardize", "gemm_and_merge", "exact_rescore"}
    assert all(0 < share < 10 for share in results["float32_parts"].values())
    assert results["float32_parts_give_the_search"] is True
    assert "faiss IndexFlatIP" in bench.format_report(results)
