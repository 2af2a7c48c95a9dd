"""Embedded datasets that need no download: brain MRI and chest x-ray phantoms in the real layouts.

Both generators write files in exactly the layout of the real datasets, so the real loaders read them.

``brain-phantom`` resamples the real MNI152 2009a T1 template and its grey/white-matter maps (shipped in
nilearn's wheel) through a per-subject random deformation, synthesizes T2, FLAIR and T1ce contrasts from
the tissue maps, plants a tumour with the BraTS labels (1 necrotic/non-enhancing core, 2 edema,
4 enhancing rim) and varies gain, bias field and noise per subject. Like real volumes, adjacent axial
slices of one subject are near-duplicates while subjects differ.

``cxr-phantom`` draws independent procedural chest radiographs (body outline, lungs, heart, mediastinum,
ribs, clavicles, diaphragm) in the NORMAL and PNEUMONIA classes, the latter with patchy opacities.

Every subject and image draws its randomness from ``(seed, index)`` alone, so a set is deterministic,
can be written in any order or in parallel, and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from memstudy.data.brain_phantom import (
    BRAIN_PHANTOM_VERSION,
    DEFAULT_N_SUBJECTS,
    brain_phantom_subject,
    write_brain_phantom,
)
from memstudy.data.cache import cache_dir
from memstudy.data.cxr_phantom import (
    CXR_PHANTOM_VERSION,
    DEFAULT_CXR_PER_CLASS,
    check_per_class,
    chest_xray_phantom_image,
    write_cxr_phantom,
)

__all__ = [
    "BRAIN_PHANTOM_VERSION",
    "CXR_PHANTOM_VERSION",
    "DEFAULT_CXR_PER_CLASS",
    "DEFAULT_N_SUBJECTS",
    "brain_phantom_subject",
    "chest_xray_phantom_image",
    "ensure_phantom",
    "phantom_root",
    "write_brain_phantom",
    "write_cxr_phantom",
]


def phantom_root(
    name: str,
    *,
    seed: int = 0,
    n_subjects: int = DEFAULT_N_SUBJECTS,
    n_per_class: dict[str, tuple[int, int]] | None = None,
) -> Path:
    """Return the cache folder of one generated phantom set (it may not exist yet).

    Parameters
    ----------
    name : {"brain-phantom", "cxr-phantom"}
        Which generator.
    seed : int
        Seed of the set.
    n_subjects : int
        Number of subjects (``brain-phantom`` only).
    n_per_class : dict of str to (int, int), optional
        ``{split: (n_normal, n_pneumonia)}`` (``cxr-phantom`` only); default
        :data:`DEFAULT_CXR_PER_CLASS`.

    Returns
    -------
    Path
        ``<cache>/phantoms/<name>-v<version>-seed<seed>-<size>``; the folder name changes with the
        generator version, the seed and the size, so a set is never reused for other parameters.
        The brain phantom's version also names the nilearn release (``v2-nilearn0.12.1``), whose
        MNI152 template it resamples.
    """
    if name == "brain-phantom":
        size = f"n{n_subjects}"
        version = f"{BRAIN_PHANTOM_VERSION}-nilearn{metadata.version('nilearn')}"
    elif name == "cxr-phantom":
        per_class = check_per_class(n_per_class)
        size = "-".join(f"{split}{n}x{p}" for split, (n, p) in per_class.items())
        version = CXR_PHANTOM_VERSION
    else:
        raise ValueError(f"unknown phantom {name!r}; expected 'brain-phantom' or 'cxr-phantom'")
    return cache_dir() / "phantoms" / f"{name}-v{version}-seed{seed}-{size}"


def ensure_phantom(
    name: str,
    *,
    seed: int = 0,
    n_subjects: int = DEFAULT_N_SUBJECTS,
    n_per_class: dict[str, tuple[int, int]] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Return the root of a cached phantom set, generating (or finishing) it first if needed.

    A set counts as cached only once its completion marker exists; a half-written folder is resumed.
    Parameters are those of :func:`phantom_root`, :func:`write_brain_phantom` and
    :func:`write_cxr_phantom`.
    """
    root = phantom_root(name, seed=seed, n_subjects=n_subjects, n_per_class=n_per_class)
    if name == "brain-phantom":
        return write_brain_phantom(root, n_subjects=n_subjects, seed=seed, workers=workers, progress=progress)
    return write_cxr_phantom(root, n_per_class=n_per_class, seed=seed, workers=workers, progress=progress)
