"""Chest x-ray loader for the Kermany 2018 / Kaggle "Chest X-Ray Images (Pneumonia)" layout.

``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``. Images vary in size and some are RGB.
Resize policy: convert to 8-bit grayscale, centre-crop to a square on the shorter side, then resize
to ``size`` × ``size`` with a Lanczos filter (anti-aliased), so anatomy keeps its aspect ratio.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from memstudy.data import image_files
from memstudy.data.cache import ImageSetWriter, cached_imageset
from memstudy.data.imageset import ImageSet

log = logging.getLogger(__name__)

CLASSES = ("NORMAL", "PNEUMONIA")
SPLITS = ("train", "val", "test")
BATCH = 64
#: Seed of the class-stratified patient order that ``n_subjects`` takes its patients from.
SUBSET_SEED = 0
#: Bump when the loader's output for the same files and options changes (it is part of the cache key).
PIPELINE_VERSION = 3


def find_split_dir(root: str | os.PathLike, split: str) -> Path:
    """Return ``<base>/<split>`` of a Kermany layout at or just below ``root``.

    ``root`` may be the ``chest_xray`` folder itself or a folder holding it. The zip's nested
    duplicate ``chest_xray/chest_xray/`` and ``__MACOSX/`` are never used.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: chest x-ray root folder does not exist")
    for base in (root, root / "chest_xray"):
        if any((base / s / c).is_dir() for s in SPLITS for c in CLASSES):
            if not (base / split).is_dir():
                raise FileNotFoundError(
                    f"{base}: no {split}/ folder (expected {split}/NORMAL, {split}/PNEUMONIA)"
                )
            return base / split
    raise FileNotFoundError(
        f"{root}: not a chest x-ray layout (expected chest_xray/{{train,val,test}}/{{NORMAL,PNEUMONIA}}/"
        f"*.jpeg at or below it)"
    )


def list_images(split_dir: Path, classes: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Return sorted ``(class, path)`` pairs, skipping macOS metadata (``._*``, ``.DS_Store``)."""
    found = []
    for label in classes:
        folder = split_dir / label
        if not folder.is_dir():
            raise FileNotFoundError(f"{split_dir}: no {label}/ class folder")
        found += [(label, p) for p in image_files.list_images(folder)]
    if not found:
        patterns = ", ".join(f"*{suffix}" for suffix in sorted(image_files.IMAGE_SUFFIXES))
        raise FileNotFoundError(f"{split_dir}: no images ({patterns}) in {', '.join(classes)}")
    return found


def patient_key(label: str, filename: str) -> str:
    """Patient of a Kermany file: ``person12_virus_34`` → person12; ``IM-0115-0001`` → IM-0115."""
    match = re.match(r"(person\d+)_", filename) or re.match(r"((?:NORMAL2-)?IM-\d+)-", filename)
    return f"{label}/{match.group(1)}" if match else f"{label}/{filename}"


def patient_group(key: str) -> int:
    """A patient's group number: the same in every split and every subset (a 63-bit hash of the key).

    Numbering patients within each load would give the ``train`` and ``test`` splits the same
    numbers for different children, and a held-out baseline would then see shared subjects.
    """
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def read_xray(path: Path, size: int) -> np.ndarray:
    """Read one radiograph as uint8 (size, size): grayscale, centre-cropped square, Lanczos-resized.

    Raises ``ValueError`` (an :class:`~memstudy.data.image_files.ImageFileError`) naming the file
    if it cannot be read as an 8-bit image.
    """
    gray = Image.fromarray(image_files.read_gray(path))
    width, height = gray.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = gray.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def stratified_patient_order(patient_classes: dict[str, str], *, seed: int = SUBSET_SEED) -> list[str]:
    """Order patients so that every prefix is a class-stratified random draw of whole patients.

    Parameters
    ----------
    patient_classes : dict of str to str
        Class of every patient (e.g. ``{"NORMAL/IM-0001": "NORMAL", ...}``).
    seed : int
        Seed of the shuffle within each class.

    Returns
    -------
    list of str
        All patients. The first n hold each class in proportion to its share of the patients
        (within one patient), so ``order[:n]`` is nested in ``order[:m]`` for n < m.

    Notes
    -----
    Each class's sorted patients are shuffled with a generator seeded by ``(seed, crc32(class))``,
    so a class's order does not depend on the other classes. The classes are then interleaved: the
    next patient comes from the class furthest below its quota ``t * n_class / n_total`` for the
    first t patients (exact integer comparison; ties go to the class first in sorted order).
    """
    by_class: dict[str, list[str]] = {}
    for patient, label in sorted(patient_classes.items()):
        by_class.setdefault(label, []).append(patient)
    labels = sorted(by_class)
    queues = {}
    for label in labels:
        members = by_class[label]
        rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
        queues[label] = [members[i] for i in rng.permutation(len(members))]
    total = len(patient_classes)
    taken = dict.fromkeys(labels, 0)
    order = []
    for t in range(1, total + 1):
        # An exhausted class has a deficit ≤ 0 and the deficits sum to n_total > 0, so it is never chosen.
        label = max(labels, key=lambda c: (t * len(queues[c]) - total * taken[c], -labels.index(c)))
        order.append(queues[label][taken[label]])
        taken[label] += 1
    return order


def load_chestxray(
    root: str | os.PathLike,
    *,
    split: Literal["train", "val", "test"] = "train",
    size: int = 256,
    classes: tuple[str, ...] = CLASSES,
    n_subjects: int | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    progress: bool = True,
) -> ImageSet:
    """Load a split of the Kermany chest x-ray layout as a one-channel ImageSet.

    Parameters
    ----------
    root : path
        The ``chest_xray`` folder or a folder holding it.
    split : {"train", "val", "test"}
        Which split to read.
    size : int
        Side of the square output images (centre crop, then Lanczos resize).
    classes : tuple of str
        Class folders to read, in order.
    n_subjects : int, optional
        Keep only the images of n patients, drawn class-stratified with a fixed seed
        (:func:`stratified_patient_order`): each class in proportion to its patients, and a
        smaller set nested in a larger one. A Kermany patient may have several images; images
        stay in class, file order.
    on_error : {"raise", "skip"}
        What to do with a file that cannot be read; skipped files are logged and listed in
        ``provenance["skipped"]``.
    progress : bool
        Show a progress bar.

    Returns
    -------
    ImageSet
        uint8 images ``(N, 1, size, size)``, channel ``"gray"``, names ``CLASS/file.jpeg``, ``groups``
        = the patient (Kermany names tie several images to one child) as :func:`patient_group`, the
        same number in every split and subset, class per image in
        ``provenance["classes"]``. Cached on disk.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    entries = list_images(find_split_dir(root, split), tuple(classes))
    patients: dict[str, int] = {}  # patient id -> group number
    for label, path in entries:
        key = patient_key(label, path.name)
        patients.setdefault(key, patient_group(key))
    if n_subjects is not None:
        if not 1 <= n_subjects <= len(patients):
            raise ValueError(f"n_subjects={n_subjects}, but the {split} split has {len(patients)} patients")
        classes_of = {patient_key(label, path.name): label for label, path in entries}
        chosen = set(stratified_patient_order(classes_of)[:n_subjects])
        entries = [(label, path) for label, path in entries if patient_key(label, path.name) in chosen]
    options = {
        "split": split,
        "size": size,
        "classes": list(classes),
        "n_subjects": n_subjects,
        "on_error": on_error,
    }

    def build(writer: ImageSetWriter) -> dict:
        kept_classes, skipped, batch, names, groups = [], [], [], [], []
        for label, path in tqdm(entries, desc=f"chest x-ray {split}", unit="image", disable=not progress):
            try:
                batch.append(read_xray(path, size))
            except ValueError as error:
                if on_error == "raise":
                    raise
                skipped.append({"path": str(path), "error": str(error)})
                log.warning("skipping %s", error)
                continue
            names.append(f"{label}/{path.name}")
            groups.append(patients[patient_key(label, path.name)])
            kept_classes.append(label)
            if len(batch) == BATCH:
                writer.append(np.stack(batch)[:, None], names, groups)
                batch, names, groups = [], [], []
        if batch:
            writer.append(np.stack(batch)[:, None], names, groups)
        if skipped:
            log.warning("skipped %d of %d chest x-ray files", len(skipped), len(entries))
        return {"root": str(Path(root).resolve()), "classes": kept_classes, "skipped": skipped}

    return cached_imageset(
        "chestxray", options, [p for _, p in entries], build, ("gray",), version=PIPELINE_VERSION
    )
