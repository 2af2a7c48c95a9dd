"""BraTS 2020 / 2021 loader: the paper's 2D slice pipeline, and a 3D volume mode.

The 2D pipeline follows the authors' public code (NOTES.md §1): each volume, per subject and per
sequence, is divided by its maximum and scaled to 0–255; 240×240 slices are zero-padded to 256×256;
an axial slice is kept when more than 15 % of its padded pixels have T1 > 50; the label map
(values 1, 2, 4) is stored as ``label * 255 / 5``.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Subject:
    """One BraTS subject: its folder name, index in the sorted subject list, and sequence files."""

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
        volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as error:
        raise ValueError(f"{path}: cannot read the {sequence.upper()} NIfTI volume ({error})") from error
    if volume.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise ValueError(f"{path}: volume contains NaN or Inf")
    return volume


def normalize_volume(volume: np.ndarray) -> np.ndarray:
    """Scale a volume to uint8 0–255 by its own maximum, as the paper's pipeline does.

    Negative values are clipped to 0 and values are truncated to integers (as ``astype(uint8)``).
    An all-zero volume stays zero.
    """
    volume = np.clip(volume, 0, None)
    peak = float(volume.max())
    if peak == 0:
        return np.zeros(volume.shape, np.uint8)
    return (volume * (255.0 / peak)).astype(np.uint8)


def encode_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """Map BraTS labels {0, 1, 2, 4} to uint8 ``label * 255 / 5`` (0, 51, 102, 204)."""
    values = np.rint(labels).astype(np.int64)
    unexpected = np.setdiff1d(np.unique(values), LABEL_VALUES)
    if unexpected.size:
        raise ValueError(f"{path}: unexpected label values {unexpected.tolist()} (expected {LABEL_VALUES})")
    return (values * 255 // 5).astype(np.uint8)


def keep_slice_mask(t1: np.ndarray, padded_pixels: int) -> np.ndarray:
    """Return which axial slices of a uint8 T1 volume (x, y, z) pass the paper's rule.

    A slice is kept when more than 15 % of its ``padded_pixels`` (256×256 in the paper) have T1 > 50.
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


def list_subjects(root: str | os.PathLike, year: int, channels: tuple[str, ...]) -> tuple[list, list]:
    """Find subjects and their sequence files; return ``(subjects, problems)``.

    ``problems`` holds ``(subject folder, error)`` for subjects with a missing sequence.
    """
    subjects, problems = [], []
    for index, folder in enumerate(find_subject_dirs(Path(root), year)):
        try:
            files = {seq: _sequence_file(folder, seq) for seq in dict.fromkeys(("t1", *channels))}
        except FileNotFoundError as error:
            problems.append((folder, error))
            continue
        subjects.append(Subject(folder.name, index, files))
    return subjects, problems


def split_subjects(
    subjects: list[Subject], holdout: int, split: str, n_subjects: int | None
) -> list[Subject]:
    """Permute subjects with a fixed seed, hold out the last ``holdout``, pick ``split``.

    ``n_subjects`` keeps the first n of the chosen split, so smaller training sets are nested in
    larger ones.
    """
    if split not in ("train", "holdout"):
        raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
    if not 0 <= holdout < len(subjects) or (split == "holdout" and holdout == 0):
        raise ValueError(
            f"holdout={holdout} subjects, but the layout has {len(subjects)} usable subjects "
            f"(holdout must be ≥ 1 for split='holdout' and leave at least one for training)"
        )
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(subjects))
    chosen = order[len(order) - holdout :] if split == "holdout" else order[: len(order) - holdout]
    if n_subjects is not None:
        if not 1 <= n_subjects <= len(chosen):
            raise ValueError(f"n_subjects={n_subjects}, but the {split} split has {len(chosen)} subjects")
        chosen = chosen[:n_subjects]
    return [subjects[i] for i in sorted(chosen)]


def load_brats(
    root: str | os.PathLike,
    *,
    year: Literal[2020, 2021] = 2020,
    channels: tuple[str, ...] = SEQUENCES,
    size: int | None = None,
    pad_to: int | None = 256,
    holdout: int = 0,
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
    holdout : int
        Subjects held out after a fixed-seed permutation of all subjects (the paper: 56; 0 keeps all).
    split : {"train", "holdout"}
        Which side of the hold-out split to load.
    n_subjects : int, optional
        Keep only the first n subjects of the split (nested: smaller sets are subsets of larger ones).
    mode : {"2d", "3d"}
        ``"2d"``: kept axial slices, shape (N, C, H, W). ``"3d"``: one image per subject, the volume
        cropped to the brain's bounding box, padded to a cube and resampled to ``size``³, shape
        (N, C, D, H, W).
    on_error : {"raise", "skip"}
        What to do with a subject whose file is missing, unreadable or of the wrong shape. Skipped
        subjects are logged and listed in ``provenance["skipped"]``.
    progress : bool
        Show a progress bar over subjects.

    Returns
    -------
    ImageSet
        uint8 images 0–255, ``names`` like ``BraTS20_Training_001/z078`` (2D) or the subject name
        (3D), ``groups`` = the subject's index in the sorted list of all subjects. Cached on disk.
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
    subjects, problems = list_subjects(root, year, channels)
    if problems and on_error == "raise":
        raise problems[0][1]
    subjects = split_subjects(subjects, holdout, split, n_subjects)
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

    return cached_imageset(f"brats{year % 100}-{mode}", options, files, build, channels)


def _add_subject(
    writer: ImageSetWriter,
    subject: Subject,
    volumes: dict[str, np.ndarray],
    channels: tuple[str, ...],
    size: int | None,
    pad_to: int | None,
    mode: str,
) -> None:
    t1 = normalize_volume(volumes["t1"])
    encoded = np.stack(
        [
            encode_labels(volumes[c], subject.files[c])
            if c == "seg"
            else (t1 if c == "t1" else normalize_volume(volumes[c]))
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
