"""The ``memstudy`` command line: user errors are one line and exit 2, bugs keep their traceback,
and only memstudy's own messages are logged at INFO unless ``-v``."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memstudy.cli import main
from memstudy.correlate import command as correlate_command

pytestmark = pytest.mark.usefixtures("restore_log_levels")


def run(argv: list, capsys) -> tuple[int, str, str]:
    """Run ``memstudy ARGV`` in-process like the entry point; return the exit status, stdout, stderr."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's errors and --help
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def npy_pair(tmp_path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.integers(0, 256, (3, 8, 8), dtype=np.uint8))
    np.save(tmp_path / "b.npy", rng.integers(0, 256, (5, 8, 8), dtype=np.uint8))
    return tmp_path / "a.npy", tmp_path / "b.npy"


def assert_one_line_error(status: int, err: str, *expected: str) -> None:
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err


def test_a_mistyped_folder_name_says_that_it_does_not_exist(tmp_path, capsys, monkeypatch, npy_pair):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "training_images").mkdir()

    status, _, err = run(["correlate", npy_pair[0], "trainig_images", "-o", "m.csv"], capsys)

    assert_one_line_error(status, err, "memstudy correlate: error: TRAIN: trainig_images does not exist")
    assert "unknown dataset" not in err


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--top-k", "0"], "argument -k/--top-k: expected a positive integer, got 0"),
        (["--chunk-mb", "-1"], "argument --chunk-mb: expected a positive number, got -1"),
        (["--slice-distance", "-2"], "argument --slice-distance: expected an integer >= 0, got -2"),
        (["--backend", "jax"], "argument --backend: invalid choice: 'jax'"),
        (["--top-k", "9"], "k must be between 1 and the number of training images (5), got 9"),
        (["--channel", "9"], "channel 9 out of range"),
    ],
)
def test_a_bad_option_value_is_one_line(npy_pair, tmp_path, capsys, option, expected):
    status, _, err = run(["correlate", *npy_pair, "-o", tmp_path / "m.csv", *option], capsys)

    assert_one_line_error(status, err, expected)
    assert not (tmp_path / "m.csv").exists()


def test_bad_data_is_one_line_naming_the_file(tmp_path, capsys, npy_pair):
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "text.npy").write_text("not an array")

    status, _, err = run(["correlate", tmp_path / "pngs", npy_pair[1], "-o", tmp_path / "m.csv"], capsys)
    assert_one_line_error(status, err, f"{tmp_path / 'pngs' / 'broken.png'}: cannot read the image")

    status, _, err = run(["correlate", tmp_path / "text.npy", npy_pair[1], "-o", tmp_path / "m.csv"], capsys)
    assert_one_line_error(status, err, f"SYNTH: {tmp_path / 'text.npy'} is not a readable .npy file")


@pytest.mark.parametrize("bug", [TypeError, AttributeError, KeyError])
def test_a_bug_keeps_its_traceback(npy_pair, tmp_path, capsys, monkeypatch, bug):
    def broken(*args, **kwargs):
        raise bug("an internal mistake")

    monkeypatch.setattr(correlate_command, "topk_pearson", broken)

    with pytest.raises(bug, match="an internal mistake"):
        main(["correlate", *map(str, npy_pair), "-o", str(tmp_path / "m.csv")])


def test_verbose_shows_the_traceback_of_a_user_error(tmp_path, npy_pair):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.npy does not exist"):
        main(["-v", "correlate", str(tmp_path / "nowhere.npy"), str(npy_pair[1]), "-o", str(tmp_path / "m")])


def test_data_prepare_with_an_option_the_loader_does_not_take_is_one_line(kermany_root, capsys):
    status, _, err = run(
        ["data", "prepare", "chestxray", "--root", kermany_root, "--option", "mode=3d"], capsys
    )

    assert_one_line_error(status, err, "chestxray: unknown option 'mode'; it takes ")


@pytest.mark.parametrize("verbose", [False, True])
def test_other_libraries_log_at_warning_unless_verbose(
    npy_pair, tmp_path, capsys, caplog, monkeypatch, verbose
):
    real_search = correlate_command.topk_pearson

    def search_and_log(*args, **kwargs):
        for name in ("papermill", "distributed.worker", "memstudy.correlate"):
            logging.getLogger(name).info("info from %s", name)
            logging.getLogger(name).debug("debug from %s", name)
        return real_search(*args, **kwargs)

    monkeypatch.setattr(correlate_command, "topk_pearson", search_and_log)

    status, _, _ = run(
        [*(["-v"] if verbose else []), "correlate", *npy_pair, "-o", tmp_path / "m.csv"], capsys
    )

    assert status == 0
    logged = {record.getMessage() for record in caplog.records}
    expected = {"info from memstudy.correlate"}
    if verbose:
        expected |= {"debug from memstudy.correlate", "info from papermill", "info from distributed.worker"}
    assert (
        logged
        & {
            f"{level} from {name}"
            for level in ("info", "debug")
            for name in ("papermill", "distributed.worker", "memstudy.correlate")
        }
        == expected
    )


def test_the_installed_entry_point_prints_one_line_and_exits_2(tmp_path):
    entry_point = Path(sys.executable).parent / "memstudy"

    result = subprocess.run(
        [str(entry_point), "correlate", str(tmp_path / "synthetic"), str(tmp_path / "training")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )

    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"memstudy correlate: error: SYNTH: {tmp_path / 'synthetic'} does not exist"
    )
    assert result.stdout == ""


def test_holdout_takes_a_subject_count_or_the_authors_split():
    from memstudy.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["data", "prepare", "brats20", "--holdout", "authors"]).holdout == "authors"
    assert parser.parse_args(["data", "prepare", "brats20", "--holdout", "56"]).holdout == 56
