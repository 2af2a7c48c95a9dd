"""BraTS 2020 / 2021 loader: the paper's 2D slice pipeline, and a 3D volume mode.

The 2D pipeline reproduces the authors' MATLAB script ``Preparation/split_volumes_to_slices.m`` in
their public repository ``muhamadusman/Assist`` (MIT licence): each volume, per subject and per
sequence, is read as double, divided by its own maximum and multiplied by 255 (still double); every
240×240 axial slice is zero-padded into a 256×256 frame (8 pixels each side); a slice is kept when more
than 15 % of the padded frame's pixels have T1 > 50, tested on the double values; the label map
(values 1, 2, 4) becomes ``label / 5 * 255`` (51, 102, 204); each slice is then written as MATLAB's
``uint8()`` does: rounded to the nearest integer with halves away from zero, saturated at 0 and 255.
The authors permuted the subjects once and trained on the first 313 (2020) or 1195 (2021) subjects of
that order, holding out the last 56; that order ships with this package (``holdout="authors"``).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from memstudy.data.cache import ImageSetWriter, cached_imageset
from memstudy.data.imageset import ImageSet

log = logging.getLogger(__name__)

SEQUENCES = ("t1", "t2", "flair", "t1ce", "seg")
SUBJECT_PATTERNS = {2020: re.compile(r"^BraTS20_Training_\d{3}$"), 2021: re.compile(r"^BraTS2021_\d{5}$")}
LABEL_VALUES = (0, 1, 2, 4)
SLICE_INTENSITY = 50  # T1 on the 0–255 scale
SLICE_FRACTION = 0.15  # of the padded slice's pixels
HOLDOUT_SEED = 0
IGNORED_DIRS = {"__MACOSX"}
#: Subjects the authors trained on: the first n of their order; the rest (56) are held out.
AUTHORS_TRAIN_SUBJECTS = {2020: 313, 2021: 1195}
#: Bump when the loader's output for the same files and options changes (it is part of the cache key).
PIPELINE_VERSION = 2


@dataclass(frozen=True)
class Subject:
    """One BraTS subject: folder name, index in the sorted list of all subject folders, sequence files."""

    name: str
    index: int
    files: dict[str, Path]


def find_subject_dirs(root: Path, year: int) -> list[Path]:
    """Return the sorted subject folders of a BraTS ``year`` layout found at or below ``root``.

    Accepts the official layout and the Kaggle 2020 copy, which nests subjects two folders down
    (``BraTS2020_TrainingData/MICCAI_BraTS2020_TrainingData/BraTS20_Training_NNN``).
    """
    if year not in SUBJECT_PATTERNS:
        raise ValueError(f"year must be 2020 or 2021, got {year!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: BraTS root folder does not exist")
    pattern = SUBJECT_PATTERNS[year]
    found: dict[str, Path] = {}
    level = [root]
    for _ in range(4):
        next_level = []
        for folder in level:
            for child in sorted(folder.iterdir()):
                if not child.is_dir() or child.name in IGNORED_DIRS or child.name.startswith("."):
                    continue
                if pattern.match(child.name):
                    found.setdefault(child.name, child)  # the shallowest copy wins
                else:
                    next_level.append(child)
        if found:
            break
        level = next_level
    if not found:
        example = "BraTS20_Training_001" if year == 2020 else "BraTS2021_00000"
        raise FileNotFoundError(
            f"{root}: not a BraTS {year} layout (looked for subject folders like {example}/ "
            f"up to 4 levels below)"
        )
    return [found[name] for name in sorted(found)]


def _sequence_file(folder: Path, sequence: str) -> Path:
    stem = f"{folder.name}_{sequence}"
    candidates = [folder / f"{stem}.nii", folder / f"{stem}.nii.gz"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if sequence == "seg":
        # BraTS 2020 subject 355 ships its label map as W39_1998.09.19_Segm.nii.
        odd = sorted(p for p in folder.iterdir() if re.search(r"seg(m)?\.nii(\.gz)?$", p.name, re.I))
        if len(odd) == 1:
            return odd[0]
    looked = " and ".join(c.name for c in candidates)
    raise FileNotFoundError(f"{folder.name}: no {sequence.upper()} volume (looked for {looked})")


def _read_volume(path: Path, sequence: str) -> np.ndarray:
    try:
        volume = np.asarray(nib.load(path).dataobj, dtype=np.float64)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as error:
        raise ValueError(f"{path}: cannot read the {sequence.upper()} NIfTI volume ({error})") from error
    if volume.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise ValueError(f"{path}: volume contains NaN or Inf")
    return volume


def scale_volume(volume: np.ndarray) -> np.ndarray:
    """Scale a volume to 0–255 by its own maximum in float64: ``volume / max * 255``, as the authors do.

    The operations and their order are MATLAB's (divide, then multiply), so the double values are
    the same as theirs. A volume whose maximum is not positive becomes all zeros.
    """
    volume = np.asarray(volume, dtype=np.float64)
    peak = float(volume.max())
    if peak <= 0:
        return np.zeros(volume.shape)
    return volume / peak * 255.0


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Convert float64 values to uint8 as MATLAB's ``uint8()`` does: halves away from zero, saturated.

    ``floor(x + 0.5)`` would round the largest double below 0.5 up (the sum rounds to 1.0), so the
    fraction is compared instead; ``x - floor(x)`` is exact.
    """
    values = np.clip(values, 0.0, 255.0)
    rounded = np.floor(values)
    rounded += (values - rounded) >= 0.5
    return rounded.astype(np.uint8)


def normalize_volume(volume: np.ndarray) -> np.ndarray:
    """Scale a volume to uint8 0–255 by its own maximum, as the paper's pipeline does.

    ``to_uint8(scale_volume(volume))``: float64 ``volume / max * 255``, rounded to the nearest integer
    with halves away from zero, negative values saturated to 0. An all-zero volume stays zero.
    """
    return to_uint8(scale_volume(volume))


def encode_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """Map BraTS labels {0, 1, 2, 4} to uint8 ``label * 255 / 5`` (0, 51, 102, 204)."""
    values = np.rint(labels).astype(np.int64)
    unexpected = np.setdiff1d(np.unique(values), LABEL_VALUES)
    if unexpected.size:
        raise ValueError(f"{path}: unexpected label values {unexpected.tolist()} (expected {LABEL_VALUES})")
    return (values * 255 // 5).astype(np.uint8)


def keep_slice_mask(t1: np.ndarray, padded_pixels: int) -> np.ndarray:
    """Return which axial slices of a T1 volume (x, y, z) pass the paper's rule.

    ``t1`` is the float64 volume on the 0–255 scale before rounding (:func:`scale_volume`), as in the
    authors' script. A slice is kept when more than 15 % of its ``padded_pixels`` (256×256 in the
    paper) have T1 > 50; padding adds only zeros, so counting in the unpadded slice is the same.
    """
    bright = np.count_nonzero(t1 > SLICE_INTENSITY, axis=(0, 1))
    return bright > SLICE_FRACTION * padded_pixels


def _pad_slices(volumes: np.ndarray, pad_to: int | None) -> np.ndarray:
    """Zero-pad (C, X, Y, Z) volumes in-plane to ``pad_to`` × ``pad_to``, centred."""
    if pad_to is None:
        return volumes
    _, nx, ny, _ = volumes.shape
    if nx > pad_to or ny > pad_to:
        raise ValueError(f"slices of {nx}×{ny} are larger than pad_to={pad_to}")
    px, py = pad_to - nx, pad_to - ny
    return np.pad(volumes, ((0, 0), (px // 2, px - px // 2), (py // 2, py - py // 2), (0, 0)))


def _resize(images: np.ndarray, size: int, channels: tuple[str, ...]) -> np.ndarray:
    """Resize (N, C, H, W) uint8 images to size × size: area averaging, nearest for label maps."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = np.empty((*images.shape[:2], size, size), np.uint8)
    for c, channel in enumerate(channels):
        method = Image.Resampling.NEAREST if channel == "seg" else Image.Resampling.BOX
        for i in range(images.shape[0]):
            out[i, c] = np.asarray(Image.fromarray(images[i, c]).resize((size, size), method))
    return out


def _cube(volumes: np.ndarray, size: int, channels: tuple[str, ...]) -> np.ndarray:
    """Crop (C, X, Y, Z) volumes to the brain's bounding box, pad it to a cube, resample to size³."""
    brain = np.any(volumes[[c for c, name in enumerate(channels) if name != "seg"]] > 0, axis=0)
    if not brain.any():
        raise ValueError("volume has no brain voxels (all sequences are zero)")
    box = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    cropped = volumes[:, box[0][0] : box[0][-1] + 1, box[1][0] : box[1][-1] + 1, box[2][0] : box[2][-1] + 1]
    side = max(cropped.shape[1:])
    pads = [(0, 0)] + [((side - n) // 2, side - n - (side - n) // 2) for n in cropped.shape[1:]]
    cube = np.pad(cropped, pads)
    zoom = size / side
    out = np.empty((len(channels), size, size, size), np.uint8)
    for c, channel in enumerate(channels):
        resampled = ndimage.zoom(cube[c].astype(np.float32), zoom, order=0 if channel == "seg" else 1)
        out[c] = np.clip(np.rint(resampled[:size, :size, :size]), 0, 255).astype(np.uint8)
    # (C, X, Y, Z) → (C, D=Z, H, W) with axial slices in the last two axes, as in 2D mode.
    return np.rot90(out.transpose(0, 3, 1, 2), axes=(2, 3)).copy()


@functools.cache
def authors_subject_order(year: int) -> tuple[str, ...]:
    """The subject order the authors fixed for BraTS ``year`` (2020: 369 names, 2021: 1251).

    Read from ``memstudy/data/authors/brats{20,21}_subject_order.txt`` (package data; source and
    licence in ``memstudy/data/authors/LICENSE``). They trained on the first
    ``AUTHORS_TRAIN_SUBJECTS[year]`` subjects and held out the rest.
    """
    if year not in AUTHORS_TRAIN_SUBJECTS:
        raise ValueError(f"year must be 2020 or 2021, got {year!r}")
    text = resources.files("memstudy.data").joinpath("authors", f"brats{year % 100}_subject_order.txt")
    return tuple(line.strip() for line in text.read_text().splitlines() if line.strip())


def split_subjects(
    names: list[str],
    holdout: int | Literal["authors"],
    split: str,
    n_subjects: int | None,
    *,
    year: int = 2020,
) -> list[str]:
    """Choose the subjects of one side of the hold-out split, by folder name.

    Parameters
    ----------
    names : list of str
        Every subject folder found, whatever files it holds, so that the split of a subject never
        depends on another subject's files or on the channels asked for.
    holdout : int or "authors"
        An int n: permute the sorted ``names`` with ``HOLDOUT_SEED`` and hold out the last n.
        ``"authors"``: the authors' order (:func:`authors_subject_order`); its first
        ``AUTHORS_TRAIN_SUBJECTS[year]`` subjects are the training side, the rest held out.
    split : {"train", "holdout"}
        Which side to return.
    n_subjects : int, optional
        Keep the first n subjects of that side's order, so smaller training sets are nested in
        larger ones.
    year : {2020, 2021}
        Which authors' order (``holdout="authors"`` only).

    Returns
    -------
    list of str
        Sorted names for an int ``holdout``; in the authors' order for ``"authors"``.
    """
    if split not in ("train", "holdout"):
        raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
    names = sorted(names)
    if holdout == "authors":
        chosen = _authors_side(names, split, year)
    elif isinstance(holdout, int) and not isinstance(holdout, bool):
        if not 0 <= holdout < len(names) or (split == "holdout" and holdout == 0):
            raise ValueError(
                f"holdout={holdout} subjects, but the layout has {len(names)} subject folders "
                f"(holdout must be ≥ 1 for split='holdout' and leave at least one for training)"
            )
        order = np.random.default_rng(HOLDOUT_SEED).permutation(len(names))
        side = order[len(order) - holdout :] if split == "holdout" else order[: len(order) - holdout]
        chosen = [names[i] for i in side]
    else:
        raise ValueError(f"holdout must be a number of subjects (int ≥ 0) or 'authors', got {holdout!r}")
    if n_subjects is not None:
        if not 1 <= n_subjects <= len(chosen):
            raise ValueError(f"n_subjects={n_subjects}, but the {split} split has {len(chosen)} subjects")
        chosen = chosen[:n_subjects]
    return chosen if holdout == "authors" else sorted(chosen)


def _authors_side(names: list[str], split: str, year: int) -> list[str]:
    """The found subjects on one side of the authors' split, in the authors' order."""
    order = authors_subject_order(year)
    position = {name: i for i, name in enumerate(order)}
    unknown = [name for name in names if name not in position]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ValueError(
            f"holdout='authors': {shown} not in the authors' BraTS {year} subject order "
            f"({len(order)} subjects); use an int holdout for other subject sets"
        )
    n_train = AUTHORS_TRAIN_SUBJECTS[year]
    found = sorted(names, key=position.__getitem__)
    chosen = [n for n in found if (position[n] < n_train) == (split == "train")]
    if not chosen:
        raise ValueError(
            f"holdout='authors': none of the {len(names)} subjects found is on the {split} side of "
            f"the authors' BraTS {year} split"
        )
    return chosen


def _subject_files(
    folders: list[Path], channels: tuple[str, ...], index: dict[str, int]
) -> tuple[list[Subject], list[tuple[Path, FileNotFoundError]]]:
    """Find each folder's sequence files; return ``(subjects, problems)`` (problems: missing files)."""
    subjects, problems = [], []
    for folder in folders:
        try:
            files = {seq: _sequence_file(folder, seq) for seq in dict.fromkeys(("t1", *channels))}
        except FileNotFoundError as error:
            problems.append((folder, error))
            continue
        subjects.append(Subject(folder.name, index[folder.name], files))
    return subjects, problems


def load_brats(
    root: str | os.PathLike,
    *,
    year: Literal[2020, 2021] = 2020,
    channels: tuple[str, ...] = SEQUENCES,
    size: int | None = None,
    pad_to: int | None = 256,
    holdout: int | Literal["authors"] = 0,
    split: Literal["train", "holdout"] = "train",
    n_subjects: int | None = None,
    mode: Literal["2d", "3d"] = "2d",
    on_error: Literal["raise", "skip"] = "raise",
    progress: bool = True,
) -> ImageSet:
    """Load BraTS subjects as an ImageSet of 2D axial slices (the paper's pipeline) or 3D volumes.

    Parameters
    ----------
    root : path
        A BraTS 2020 or 2021 training folder, or any folder up to four levels above the subjects
        (the Kaggle 2020 copy nests them two levels down). ``.nii`` and ``.nii.gz`` both work.
    year : {2020, 2021}
        Which naming scheme to look for (``BraTS20_Training_NNN`` or ``BraTS2021_NNNNN``).
    channels : tuple of str
        Sequences to keep, in order, from ``t1``, ``t2``, ``flair``, ``t1ce``, ``seg``. T1 is read in
        any case because the slice rule uses it.
    size : int, optional
        2D: resample the padded slices to ``size`` × ``size`` after the paper's pipeline (area
        averaging; nearest for ``seg``). 3D: the cube's side (default 64).
    pad_to : int or None
        Zero-pad slices in-plane to this size (the paper: 256). The 15 % slice rule counts pixels of
        the padded slice.
    holdout : int or "authors"
        An int n: hold out the last n subjects of a fixed-seed (``HOLDOUT_SEED``) permutation of all
        subject folders found (0 keeps all). ``"authors"``: the authors' own split of real BraTS
        (train on the first 313 (2020) or 1195 (2021) subjects of their order, hold out the last 56);
        every subject folder found must be in their list. Either way a subject's side depends only on
        the subject folders present, never on their files or on ``channels``.
    split : {"train", "holdout"}
        Which side of the hold-out split to load.
    n_subjects : int, optional
        Keep only the first n subjects of the split's order (nested: smaller sets are subsets of
        larger ones). Chosen before incomplete subjects are dropped, so ``on_error="skip"`` can
        give fewer.
    mode : {"2d", "3d"}
        ``"2d"``: kept axial slices, shape (N, C, H, W). ``"3d"``: one image per subject, the volume
        cropped to the brain's bounding box, padded to a cube and resampled to ``size``³, shape
        (N, C, D, H, W).
    on_error : {"raise", "skip"}
        What to do with a chosen subject whose file is missing, unreadable or of the wrong shape.
        Skipped subjects are logged and listed in ``provenance["skipped"]``.
    progress : bool
        Show a progress bar over subjects.

    Returns
    -------
    ImageSet
        uint8 images 0–255, ``names`` like ``BraTS20_Training_001/z078`` (2D) or the subject name
        (3D), ``groups`` = the subject's index in the sorted list of all subject folders found.
        Subjects come in sorted order (int ``holdout``) or the authors' order (``"authors"``).
        Cached on disk.
    """
    channels = tuple(channels)
    if not channels or set(channels) - set(SEQUENCES):
        raise ValueError(f"channels must be a non-empty subset of {SEQUENCES}, got {channels}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if mode not in ("2d", "3d"):
        raise ValueError(f"mode must be '2d' or '3d', got {mode!r}")
    if mode == "3d" and size is None:
        size = 64
    folders = find_subject_dirs(Path(root), year)
    by_name = {folder.name: folder for folder in folders}
    chosen = split_subjects(list(by_name), holdout, split, n_subjects, year=year)
    index = {name: i for i, name in enumerate(by_name)}
    subjects, problems = _subject_files([by_name[name] for name in chosen], channels, index)
    if problems and on_error == "raise":
        raise problems[0][1]
    options = {
        "year": year,
        "channels": channels,
        "size": size,
        "pad_to": pad_to,
        "holdout": holdout,
        "split": split,
        "n_subjects": n_subjects,
        "mode": mode,
        "on_error": on_error,
    }
    files = [f for s in subjects for f in s.files.values()]

    def build(writer: ImageSetWriter) -> dict:
        skipped = [{"path": str(folder), "error": str(error)} for folder, error in problems]
        expected_shape = None
        for subject in tqdm(subjects, desc=f"BraTS {year} {split}", unit="subject", disable=not progress):
            try:
                volumes = {seq: _read_volume(path, seq) for seq, path in subject.files.items()}
                shapes = {seq: v.shape for seq, v in volumes.items()}
                expected_shape = expected_shape or volumes["t1"].shape
                for seq, shape in shapes.items():
                    if shape != expected_shape:
                        raise ValueError(
                            f"{subject.files[seq]}: volume shape {shape}, expected "
                            f"{expected_shape} like the other volumes"
                        )
                _add_subject(writer, subject, volumes, channels, size, pad_to, mode)
            except ValueError as error:
                if on_error == "raise":
                    raise
                skipped.append({"path": str(subject.files.get("t1", subject.name)), "error": str(error)})
                log.warning("skipping %s: %s", subject.name, error)
        if skipped:
            log.warning("skipped %d of %d BraTS subjects", len(skipped), len(subjects) + len(problems))
        return {"root": str(Path(root).resolve()), "subjects": [s.name for s in subjects], "skipped": skipped}

    return cached_imageset(
        f"brats{year % 100}-{mode}", options, files, build, channels, version=PIPELINE_VERSION
    )


def _add_subject(
    writer: ImageSetWriter,
    subject: Subject,
    volumes: dict[str, np.ndarray],
    channels: tuple[str, ...],
    size: int | None,
    pad_to: int | None,
    mode: str,
) -> None:
    t1 = scale_volume(volumes["t1"])  # the slice rule reads the unrounded values
    encoded = np.stack(
        [
            encode_labels(volumes[c], subject.files[c])
            if c == "seg"
            else to_uint8(t1 if c == "t1" else scale_volume(volumes[c]))
            for c in channels
        ]
    )
    if mode == "3d":
        writer.append(_cube(encoded, size, channels)[None], [subject.name], [subject.index])
        return
    padded = _pad_slices(encoded, pad_to)
    keep = np.flatnonzero(keep_slice_mask(t1, padded.shape[1] * padded.shape[2]))
    if keep.size == 0:
        log.info("%s: no slice passes the 15 %% T1 rule", subject.name)
        return
    # (C, X, Y, Z) → (N=Z, C, H, W), rotated so that anterior is up as in radiological viewers.
    slices = np.rot90(padded[..., keep].transpose(3, 0, 1, 2), axes=(2, 3))
    slices = _resize(np.ascontiguousarray(slices), size, channels) if size else np.ascontiguousarray(slices)
    writer.append(slices, [f"{subject.name}/z{z:03d}" for z in keep], [subject.index] * keep.size)
