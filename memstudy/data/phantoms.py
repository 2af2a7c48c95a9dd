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

import concurrent.futures
import contextlib
import csv
import functools
import json
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from memstudy.atomic import atomic_open, atomic_path, write_json
from memstudy.data.cache import cache_dir

log = logging.getLogger(__name__)

# Bump a version whenever the generator's output changes: it is part of the cache folder name.
BRAIN_PHANTOM_VERSION = 1
CXR_PHANTOM_VERSION = 1

DEFAULT_N_SUBJECTS = 32
DEFAULT_CXR_PER_CLASS: dict[str, tuple[int, int]] = {"train": (200, 300), "val": (8, 8), "test": (50, 50)}

BRATS_SHAPE = (240, 240, 155)
BRATS_DIR = "MICCAI_BraTS2020_TrainingData"
SEQUENCES = ("t1", "t1ce", "t2", "flair")
COMPLETE_MARKER = "COMPLETE.json"

# Real BraTS volumes carry this affine (LPS voxel order, 1 mm, origin on voxel (0, 239, 0)).
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])

# Normal-tissue signal per sequence as (grey matter, white matter, CSF), on a scale where template-T1
# white matter is about 0.85. T1 itself is the template's own T1 image.
_TISSUE_SIGNAL = {
    "t1ce": (0.52, 0.68, 0.16),
    "t2": (0.55, 0.40, 1.00),
    "flair": (0.60, 0.45, 0.10),
}
# Tumour signal per sequence for (necrotic core, edema, enhancing rim) of a high-grade tumour and for the
# non-enhancing core of a low-grade one.
_TUMOUR_SIGNAL = {
    "t1": {"ncr": 0.25, "ed": 0.60, "et": 0.55, "net": 0.45},
    "t1ce": {"ncr": 0.20, "ed": 0.52, "et": 1.30, "net": 0.42},
    "t2": {"ncr": 1.00, "ed": 0.85, "et": 0.62, "net": 0.85},
    "flair": {"ncr": 0.35, "ed": 0.95, "et": 0.75, "net": 0.85},
}
_LGG_FRACTION = 0.2  # BraTS 2020 has 76 low-grade of 369 subjects


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
    """
    if name == "brain-phantom":
        size = f"n{n_subjects}"
        version = BRAIN_PHANTOM_VERSION
    elif name == "cxr-phantom":
        per_class = _check_per_class(n_per_class)
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


# --------------------------------------------------------------------------------------------------------
# Shared helpers


def _marker_matches(root: Path, params: dict) -> bool:
    """Whether ``root`` holds a completion marker written for exactly ``params``."""
    marker = root / COMPLETE_MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()) == params


def _run_jobs(
    function: Callable[..., None],
    jobs: list[tuple],
    *,
    workers: int | None,
    progress: bool,
    desc: str,
    unit: str,
) -> None:
    """Call ``function(*job)`` for every job, in ``workers`` processes, with a progress bar."""
    if workers is None:
        workers = min(os.cpu_count() or 1, 4)
    workers = max(1, min(workers, len(jobs)))
    with tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress) as bar:
        if workers == 1:
            for job in jobs:
                function(*job)
                bar.update()
            return
        # spawn, not fork: the parent may hold threads (BLAS, tqdm) that a fork would copy mid-flight.
        context = multiprocessing.get_context("spawn")
        with (
            _single_threaded_children(),
            concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool,
        ):
            futures = [pool.submit(function, *job) for job in jobs]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    bar.update()
            except BaseException:  # a failure or Ctrl-C: drop the queued jobs instead of running them
                for future in futures:
                    future.cancel()
                raise


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Start child processes with one BLAS/OpenMP thread each.

    The processes already use every core; BLAS threads on top of them oversubscribe the cores, and
    OpenBLAS's waiting threads then made the small matrix products here ten times slower.
    """
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _gaussian_basis(coords: np.ndarray, spacing: float, extent: float) -> np.ndarray:
    """Gaussian bumps of width ``spacing`` centred every ``spacing`` over ``[-spacing, extent + spacing]``.

    Returns float32 of shape ``(len(coords), n_centres)``.
    """
    centres = np.arange(-spacing, extent + 2 * spacing, spacing)
    return np.exp(-0.5 * ((coords[:, None] - centres[None, :]) / spacing) ** 2).astype(np.float32)


def _n_centres(spacing: float, extent: float) -> int:
    return len(np.arange(-spacing, extent + 2 * spacing, spacing))


def _smooth_field(coefficients: np.ndarray, axes: list[np.ndarray], spacing: float, extents) -> np.ndarray:
    """Evaluate a smooth random field on the grid spanned by ``axes``.

    The field is a sum of separable Gaussian bumps with ``coefficients`` (shape ``(..., n0, n1[, n2])``
    of independent N(0, 1) draws) on a fixed lattice over ``extents``, so it is defined in absolute
    coordinates and any sub-grid evaluates the same values. Contracting one axis at a time makes this
    far cheaper than smoothing white noise at full resolution. The result has about unit variance.
    """
    # sum of squared unit Gaussians on a lattice of the same spacing is sqrt(pi) per dimension
    out = (coefficients / math.pi ** (len(axes) / 4)).astype(np.float32)
    for axis_coords, extent in zip(axes, extents, strict=True):
        basis = _gaussian_basis(np.asarray(axis_coords, np.float32), spacing, extent)
        # contract the first lattice axis; the evaluated axis is appended last, so after all axes the
        # order is restored
        out = np.tensordot(out, basis, axes=([out.ndim - len(axes)], [1]))
    return out


# --------------------------------------------------------------------------------------------------------
# Brain phantom


@dataclass(frozen=True)
class _Template:
    """The MNI152 template, cropped to the brain, as float32 arrays in template voxel coordinates."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    offset: np.ndarray  # template voxel index of the crop's first voxel
    lower: np.ndarray  # brain bounding box in (uncropped) template voxels
    upper: np.ndarray
    tumour_sites: np.ndarray  # (n, 3) uncropped template voxels where a tumour may be centred


@functools.lru_cache(maxsize=1)
def _template() -> _Template:
    """Load the MNI152 T1/GM/WM templates from nilearn's wheel (no download), once per process."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    t1 = load_mni152_template(resolution=1).get_fdata(dtype=np.float32)
    gm = load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    mask = t1 > 0  # skull-stripped: the template is exactly zero outside the brain
    nonzero = np.nonzero(mask)
    lower = np.array([ax.min() for ax in nonzero])
    upper = np.array([ax.max() for ax in nonzero])
    start = np.maximum(lower - 2, 0)
    stop = np.minimum(upper + 3, mask.shape)
    crop = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    # Gliomas sit mostly in cerebral white matter: centres at least 12 mm inside the brain, above the
    # cerebellum (template z >= 75, about 3 mm above the AC plane).
    depth = ndi.distance_transform_edt(mask)
    sites = np.argwhere((wm > 0.7) & (depth > 12))
    sites = sites[sites[:, 2] >= 75]
    return _Template(
        t1=np.ascontiguousarray(t1[crop]),
        gm=np.ascontiguousarray(gm[crop] * mask[crop]),
        wm=np.ascontiguousarray(wm[crop] * mask[crop]),
        offset=start.astype(np.float32),
        lower=lower,
        upper=upper,
        tumour_sites=sites,
    )


# Template voxel mapped to the output grid's reference point, and where that point is: the top of the
# template brain (z = 154) lands near slice 141 (up to about 150), as in BraTS volumes, and the
# lower brainstem is cut below.
_TEMPLATE_CENTRE = np.array([98.0, 117.0, 100.0])
_OUTPUT_CENTRE = np.array([119.5, 119.5, 87.0])
_DEFORM_SPACING = 28.0  # mm between displacement lattice points
_BIAS_SPACING = 60.0
_TEXTURE_SPACING = 4.0
_SHAPE_SPACING = 7.0
_VENTRICLE_CENTRE = np.array([98.0, 120.0, 86.0])  # template voxel amid the lateral ventricles
_MAX_CORE_RADIUS = 20.0  # mm
_MAX_EDEMA_FACTOR = 2.3
# The edema reaches at most 1.6 × core radius × edema factor from the centre (ellipsoid axes up to 1.2,
# irregularity down to 0.75): the tumour's box is that plus a margin.
_TUMOUR_REACH = 1.6
_TUMOUR_HALF = math.ceil(_TUMOUR_REACH * _MAX_CORE_RADIUS * _MAX_EDEMA_FACTOR + 3)  # voxels
_TUMOUR_EXTENT = 2.0 * _TUMOUR_HALF  # mm spanned by the tumour's irregularity lattice


@dataclass(frozen=True)
class _SubjectParams:
    """Every random choice of one brain-phantom subject except the voxel noise."""

    linear: np.ndarray  # (3, 3) output voxel offset -> template voxel offset
    shift: np.ndarray  # (3,) output-grid translation of the brain, voxels
    displacement: np.ndarray  # (3, n, n, n) lattice coefficients, already scaled to mm
    grade: str  # "HGG" or "LGG"
    tumour_centre: np.ndarray  # (3,) template voxel
    tumour_axes: np.ndarray  # (3, 3) maps an output offset to normalized ellipsoid coordinates
    core_radius: float  # mm
    necrosis_fraction: float  # necrotic radius / core radius (0: no necrosis)
    edema_factor: float  # edema radius / core radius
    mass_effect: float  # 0..0.6, fraction by which tissue near the centre is pushed out
    ventricle_growth: float  # -0.15..0.35, the same for the ventricles (negative: shrink)
    shape_coefficients: np.ndarray  # (2, n, n, n) irregularity of the core and the necrosis
    texture_coefficients: np.ndarray  # (n, n, n) heterogeneity inside the tumour
    t1_gamma: float
    tissue_signal: dict  # sequence -> (gm, wm, csf)
    tumour_signal: dict  # sequence -> class -> value
    bias_coefficients: np.ndarray  # (n, n, n)
    bias_strength: np.ndarray  # (4,)
    noise: np.ndarray  # (4,) noise standard deviation relative to white matter
    scale: np.ndarray  # (4,) int16 value of signal 1.0


def _subject_grade(seed: int, index: int) -> str:
    """The subject's grade, drawn from its own stream so that it is known without generating it."""
    return "LGG" if np.random.default_rng([seed, index, 2]).random() < _LGG_FRACTION else "HGG"


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from angles (radians) about the x, y and z axes, applied in that order."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _subject_params(seed: int, index: int, template: _Template) -> _SubjectParams:
    rng = np.random.default_rng([seed, index])
    # Global pose and size: the output grid samples the template at linear @ (p - centre), with p in
    # output voxels; voxel axes 0 and 1 run right-to-left and anterior-to-posterior (LPS, as BraTS).
    size = np.exp(rng.normal(0.0, 0.04)) * np.exp(rng.normal(0.0, 0.03, size=3))
    angles = np.deg2rad(rng.uniform(-1, 1, size=3) * np.array([8.0, 5.0, 10.0]))
    flip = np.diag([-1.0, -1.0, 1.0])
    linear = _rotation(angles) @ np.diag(1.0 / size) @ flip
    shift = rng.normal(0.0, [4.0, 4.0, 3.0])
    n = _n_centres(_DEFORM_SPACING, max(BRATS_SHAPE))
    displacement = rng.normal(0.0, 5.0, size=(3, n, n, n))  # mm of smooth local warping

    grade = _subject_grade(seed, index)
    tumour_centre = template.tumour_sites[rng.integers(len(template.tumour_sites))].astype(float)
    tumour_axes = np.diag(1.0 / rng.uniform(0.8, 1.2, size=3)) @ _rotation(rng.uniform(0, np.pi, 3))
    core_radius = rng.uniform(7.0, _MAX_CORE_RADIUS)
    if grade == "LGG" or rng.random() < 0.1:
        necrosis_fraction = 0.0
    else:
        necrosis_fraction = rng.uniform(0.3, 0.75)
    edema_factor = rng.uniform(1.4, _MAX_EDEMA_FACTOR) if grade == "HGG" else rng.uniform(1.2, 1.8)
    mass_effect = rng.uniform(0.15, 0.55)
    ventricle_growth = rng.uniform(-0.15, 0.35)
    n_shape = _n_centres(_SHAPE_SPACING, _TUMOUR_EXTENT)
    shape_coefficients = rng.normal(size=(2, n_shape, n_shape, n_shape))
    n_texture = _n_centres(_TEXTURE_SPACING, _TUMOUR_EXTENT)
    texture_coefficients = rng.normal(size=(n_texture, n_texture, n_texture))

    t1_gamma = rng.uniform(0.8, 1.25)
    tissue_signal = {s: tuple(v * rng.uniform(0.92, 1.08) for v in sig) for s, sig in _TISSUE_SIGNAL.items()}
    tumour_signal = {
        s: {c: v * rng.uniform(0.9, 1.1) for c, v in sig.items()} for s, sig in _TUMOUR_SIGNAL.items()
    }
    n_bias = _n_centres(_BIAS_SPACING, max(BRATS_SHAPE))
    bias_coefficients = rng.normal(size=(n_bias, n_bias, n_bias))
    bias_strength = rng.uniform(0.04, 0.15, size=4)
    noise = rng.uniform(0.02, 0.05, size=4)
    scale = np.exp(rng.uniform(np.log(300), np.log(2500), size=4))
    return _SubjectParams(
        linear=linear,
        shift=shift,
        displacement=displacement,
        grade=grade,
        tumour_centre=tumour_centre,
        tumour_axes=tumour_axes,
        core_radius=core_radius,
        necrosis_fraction=necrosis_fraction,
        edema_factor=edema_factor,
        mass_effect=mass_effect,
        ventricle_growth=ventricle_growth,
        shape_coefficients=shape_coefficients,
        texture_coefficients=texture_coefficients,
        t1_gamma=t1_gamma,
        tissue_signal=tissue_signal,
        tumour_signal=tumour_signal,
        bias_coefficients=bias_coefficients,
        bias_strength=bias_strength,
        noise=noise,
        scale=scale,
    )


def _sub_box(
    axes: list[np.ndarray], centre: np.ndarray, half: int
) -> tuple[tuple[slice, ...], list[np.ndarray]]:
    """The part of the grid spanned by ``axes`` within ``half`` voxels of ``centre``, and its offsets."""
    box = []
    for axis, c in zip(axes, centre, strict=True):
        lo = int(np.searchsorted(axis, round(c) - half))
        hi = int(np.searchsorted(axis, round(c) + half + 1))
        box.append(slice(lo, hi))
    offsets = [axis[b] - np.float32(c) for axis, b, c in zip(axes, box, centre, strict=True)]
    return tuple(box), offsets


def _pull(coords: np.ndarray, offsets: list[np.ndarray], linear: np.ndarray, strength: float, radius: float):
    """Pull sampling coordinates towards the centre of ``offsets``, in place: tissue there looks larger.

    The radial map r -> r (1 - k exp(-r^2 / R^2)) is monotonic for -2 < k < 1, so no tissue folds;
    a negative ``strength`` k shrinks the tissue instead.
    """
    r2 = offsets[0][:, None, None] ** 2 + offsets[1][None, :, None] ** 2 + offsets[2][None, None, :] ** 2
    pull = np.float32(strength) * np.exp(-r2 / np.float32(radius**2))
    for d in range(3):
        coords[d] -= pull * (
            linear[d, 0] * offsets[0][:, None, None]
            + linear[d, 1] * offsets[1][None, :, None]
            + linear[d, 2] * offsets[2][None, None, :]
        ).astype(np.float32)


def _output_box(params: _SubjectParams, template: _Template, centre: np.ndarray) -> tuple[slice, ...]:
    """Output voxels that can show brain: the template's brain box mapped back, plus warp margin."""
    inverse = np.linalg.inv(params.linear)
    corners = np.array(
        [
            [lo if bit else hi for bit, lo, hi in zip(bits, template.lower, template.upper, strict=True)]
            for bits in np.ndindex(2, 2, 2)
        ],
        dtype=float,
    )
    mapped = (corners - _TEMPLATE_CENTRE) @ inverse.T + centre
    margin = 16  # covers the smooth displacement (a few mm) with room to spare
    start = np.clip(np.floor(mapped.min(0)) - margin, 0, BRATS_SHAPE).astype(int)
    stop = np.clip(np.ceil(mapped.max(0)) + margin, 0, BRATS_SHAPE).astype(int)
    return tuple(slice(a, b) for a, b in zip(start, stop, strict=True))


def _sampling_coordinates(
    params: _SubjectParams, template: _Template, centre: np.ndarray, axes: list[np.ndarray]
) -> tuple[np.ndarray, tuple[slice, ...], list[np.ndarray]]:
    """Template voxel (in the cropped template) that each output voxel of the box samples.

    Global pose, smooth local displacement, ventricle size and the tumour's mass effect. Also returns
    the tumour's sub-box of the output box and the offsets of its voxels from the tumour centre.
    """
    box_shape = tuple(len(a) for a in axes)
    displacement = _smooth_field(params.displacement, axes, _DEFORM_SPACING, [max(BRATS_SHAPE)] * 3)
    coords = np.empty((3, *box_shape), np.float32)
    relative = [a - c for a, c in zip(axes, centre, strict=True)]
    for d in range(3):
        coords[d] = (
            params.linear[d, 0] * relative[0][:, None, None]
            + params.linear[d, 1] * relative[1][None, :, None]
            + params.linear[d, 2] * relative[2][None, None, :]
        )
        coords[d] += displacement[d] + (_TEMPLATE_CENTRE[d] - template.offset[d])
    del displacement
    ventricles_out = np.linalg.solve(params.linear, _VENTRICLE_CENTRE - _TEMPLATE_CENTRE) + centre
    vbox, voffset = _sub_box(axes, ventricles_out, 60)
    _pull(coords[(slice(None), *vbox)], voffset, params.linear, params.ventricle_growth, 30.0)
    # Where the tumour sits on the output grid (ignoring the small local warp).
    tumour_out = np.linalg.solve(params.linear, params.tumour_centre - _TEMPLATE_CENTRE) + centre
    half = math.ceil(_TUMOUR_REACH * params.core_radius * params.edema_factor + 3)
    tbox, toffset = _sub_box(axes, tumour_out, half)
    _pull(coords[(slice(None), *tbox)], toffset, params.linear, params.mass_effect, 1.2 * params.core_radius)
    return coords, tbox, toffset


def brain_phantom_subject(seed: int, index: int) -> dict[str, np.ndarray]:
    """Generate one brain-phantom subject in memory.

    Parameters
    ----------
    seed : int
        Seed of the set.
    index : int
        Subject number, from 1 (``BraTS20_Training_001``). Each subject depends only on ``(seed, index)``.

    Returns
    -------
    dict of str to ndarray
        ``t1``, ``t1ce``, ``t2``, ``flair``: int16, shape (240, 240, 155), 0 outside the brain;
        ``seg``: uint8, same shape, values {0, 1, 2, 4} (necrotic or non-enhancing core, edema,
        enhancing tumour). Voxel axes run right-to-left, anterior-to-posterior, inferior-to-superior.
    """
    template = _template()
    params = _subject_params(seed, index, template)
    noise_rng = np.random.default_rng([seed, index, 1])
    centre = _OUTPUT_CENTRE + params.shift
    box = _output_box(params, template, centre)
    axes = [np.arange(b.start, b.stop, dtype=np.float32) for b in box]
    box_shape = tuple(len(a) for a in axes)

    def sample(volume: np.ndarray, points: np.ndarray) -> np.ndarray:
        return ndi.map_coordinates(volume, points, order=1, mode="constant", cval=0.0, output=np.float32)

    # Sample T1 over the box to find the brain, then everything else only at brain voxels (about a
    # quarter of the box): per-voxel work below runs on flat arrays of those voxels.
    coords, tbox, toffset = _sampling_coordinates(params, template, centre, axes)
    t1 = sample(template.t1, coords)
    mask = t1 > 0.06  # the brain's edge rises from 0 to >= 0.11 within one voxel
    brain = np.flatnonzero(mask)
    t1 = t1.ravel()[brain]
    brain_coords = coords.reshape(3, -1)[:, brain]
    gm, wm = (sample(volume, brain_coords) for volume in (template.gm, template.wm))
    del brain_coords
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)

    # The tumour needs its neighbourhood as a volume; `inside` are its box's brain voxels and `where`
    # their positions in the flat arrays.
    tumour_coords = coords[(slice(None), *tbox)]
    tumour_wm = sample(template.wm, tumour_coords)
    tumour_csf = np.clip(1.0 - sample(template.gm, tumour_coords) - tumour_wm, 0.0, 1.0)
    del coords, tumour_coords
    seg, tumour_weights, texture = _tumour(params, toffset, tumour_wm, tumour_csf, mask[tbox])
    position = np.full(box_shape, -1, np.int64)
    position.ravel()[brain] = np.arange(len(brain))
    inside = position[tbox] >= 0
    where = position[tbox][inside]
    del position
    tumour_total = sum(tumour_weights.values())[inside]
    tumour_weights = {c: w[inside] for c, w in tumour_weights.items()}
    texture = texture[inside]

    # One coil-sensitivity (bias) field per session, with a strength per sequence.
    bias = _smooth_field(params.bias_coefficients, axes, _BIAS_SPACING, [max(BRATS_SHAPE)] * 3).ravel()[brain]
    images = {}
    for s, sequence in enumerate(SEQUENCES):
        if sequence == "t1":
            # a power keeps white matter (about 0.85) in place and varies the grey/white contrast
            signal = np.float32(0.85) * (t1 / np.float32(0.85)) ** np.float32(params.t1_gamma)
        else:
            grey, white, fluid = (np.float32(v) for v in params.tissue_signal[sequence])
            signal = grey * gm + white * wm + fluid * csf
        tumour_signal = sum(params.tumour_signal[sequence][c] * w for c, w in tumour_weights.items())
        signal[where] = signal[where] * (1.0 - tumour_total) + tumour_signal * (1.0 + 0.2 * texture)
        signal *= np.exp(np.float32(params.bias_strength[s]) * bias)
        signal += noise_rng.standard_normal(len(brain), dtype=np.float32) * np.float32(params.noise[s])
        np.clip(signal * np.float32(params.scale[s]), 0.0, None, out=signal)
        in_box = np.zeros(box_shape, np.int16)
        in_box.ravel()[brain] = np.rint(signal)
        volume = np.zeros(BRATS_SHAPE, np.int16)
        volume[box] = in_box
        images[sequence] = volume

    label = np.zeros(BRATS_SHAPE, np.uint8)
    label[box][tbox] = seg
    images["seg"] = label
    return images


def _tumour(
    params: _SubjectParams,
    offset: list[np.ndarray],
    wm: np.ndarray,
    csf: np.ndarray,
    mask: np.ndarray,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Label map, soft per-class weights and texture of the tumour inside its box.

    The core is an irregular ellipsoid; its inner part is necrotic (high grade) and the rest an
    enhancing rim; low-grade cores are non-enhancing throughout. Edema extends further, mainly along
    white matter and not into CSF, as vasogenic edema does.
    """
    local = [o + _TUMOUR_HALF for o in offset]  # lattice coordinates of the irregularity fields
    shape = _smooth_field(params.shape_coefficients, local, _SHAPE_SPACING, [_TUMOUR_EXTENT] * 3)
    texture = _smooth_field(params.texture_coefficients, local, _TEXTURE_SPACING, [_TUMOUR_EXTENT] * 3)
    a = params.tumour_axes
    ellipsoid = np.sqrt(
        sum(
            (
                a[d, 0] * offset[0][:, None, None]
                + a[d, 1] * offset[1][None, :, None]
                + a[d, 2] * offset[2][None, None, :]
            )
            ** 2
            for d in range(3)
        )
    )
    # bounded irregularity (0.75-1.25): an unbounded one would scatter islands of tumour far away
    core_distance = ellipsoid * (1.0 + 0.125 * np.clip(shape[0], -2, 2))
    core = (core_distance < params.core_radius) & mask
    necrosis_distance = ellipsoid * (1.0 + 0.125 * np.clip(shape[1], -2, 2))
    necrosis = core & (necrosis_distance < params.core_radius * params.necrosis_fraction)
    white = ndi.gaussian_filter(wm, 1.5)
    edema_reach = params.core_radius * params.edema_factor * (0.4 + 0.6 * np.clip(white, 0, 1))
    edema = (core_distance < edema_reach) & (csf < 0.6) & mask & ~core

    seg = np.zeros(core.shape, np.uint8)
    seg[edema] = 2
    if params.grade == "LGG":
        seg[core] = 1
        classes = {"ed": edema, "net": core}
    else:
        seg[core] = 4
        seg[necrosis] = 1
        classes = {"ed": edema, "et": core & ~necrosis, "ncr": necrosis}
    # Soften the class boundaries by a fraction of a voxel, as partial volume does.
    weights = {c: ndi.gaussian_filter(m.astype(np.float32), 0.7) * mask for c, m in classes.items()}
    return seg, weights, texture


def _write_brain_subject(root: Path, seed: int, index: int) -> None:
    subject = f"BraTS20_Training_{index:03d}"
    folder = root / BRATS_DIR / subject
    volumes = brain_phantom_subject(seed, index)
    for name, volume in volumes.items():
        image = nib.Nifti1Image(volume, BRATS_AFFINE)
        image.header.set_xyzt_units("mm", "sec")
        image.set_qform(BRATS_AFFINE, code=1)
        image.set_sform(BRATS_AFFINE, code=1)
        with atomic_path(folder / f"{subject}_{name}.nii.gz") as tmp:
            nib.save(image, tmp)


def _brain_subject_complete(root: Path, index: int) -> bool:
    subject = f"BraTS20_Training_{index:03d}"
    folder = root / BRATS_DIR / subject
    return all((folder / f"{subject}_{name}.nii.gz").is_file() for name in (*SEQUENCES, "seg"))


def write_brain_phantom(
    root: str | os.PathLike,
    *,
    n_subjects: int = DEFAULT_N_SUBJECTS,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write a brain phantom in the BraTS 2020 training-data layout.

    Parameters
    ----------
    root : path
        Folder to write into; created if needed.
    n_subjects : int
        Number of subjects, ``BraTS20_Training_001`` to ``BraTS20_Training_<n_subjects>``.
    seed : int
        Seed of the set; subject ``i`` depends only on ``(seed, i)``.
    workers : int, optional
        Processes generating subjects in parallel; default ``min(cpu_count, 4)``.
    progress : bool
        Show a progress bar.

    Returns
    -------
    Path
        ``root``, holding ``MICCAI_BraTS2020_TrainingData/BraTS20_Training_NNN/
        BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}.nii.gz`` (images int16, seg uint8 with {0, 1, 2, 4},
        240×240×155, 1 mm, the BraTS affine), ``name_mapping.csv`` and ``COMPLETE.json``.

    Notes
    -----
    Subjects whose five files all exist are skipped, so an interrupted run resumes and a deleted file
    is rewritten; every file is written atomically. ``COMPLETE.json`` (the parameters) is written
    last: a folder without it is unfinished.
    """
    root = Path(root)
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}")
    params = {
        "generator": "brain-phantom",
        "version": BRAIN_PHANTOM_VERSION,
        "seed": seed,
        "n_subjects": n_subjects,
    }
    todo = [i for i in range(1, n_subjects + 1) if not _brain_subject_complete(root, i)]
    if not todo and _marker_matches(root, params):
        return root
    (root / COMPLETE_MARKER).unlink(missing_ok=True)
    log.info("brain-phantom: %d of %d subjects to write under %s", len(todo), n_subjects, root)
    _run_jobs(
        _write_brain_subject,
        [(root, seed, i) for i in todo],
        workers=workers,
        progress=progress,
        desc="brain-phantom",
        unit="subject",
    )
    _write_name_mapping(root / BRATS_DIR / "name_mapping.csv", seed, n_subjects)
    write_json(root / COMPLETE_MARKER, params)
    return root


def _write_name_mapping(path: Path, seed: int, n_subjects: int) -> None:
    """Write ``name_mapping.csv`` with the real file's columns (the other datasets' IDs are NA)."""
    columns = [
        "Grade",
        "BraTS_2017_subject_ID",
        "BraTS_2018_subject_ID",
        "TCGA_TCIA_subject_ID",
        "BraTS_2019_subject_ID",
        "BraTS_2020_subject_ID",
    ]
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for i in range(1, n_subjects + 1):
            writer.writerow([_subject_grade(seed, i), "NA", "NA", "NA", "NA", f"BraTS20_Training_{i:03d}"])


# --------------------------------------------------------------------------------------------------------
# Chest x-ray phantom


def _check_per_class(n_per_class: dict[str, tuple[int, int]] | None) -> dict[str, tuple[int, int]]:
    per_class = DEFAULT_CXR_PER_CLASS if n_per_class is None else n_per_class
    unknown = set(per_class) - {"train", "val", "test"}
    if unknown:
        raise ValueError(f"n_per_class has unknown splits {sorted(unknown)}; expected train, val, test")
    return {
        split: (int(per_class[split][0]), int(per_class[split][1]))
        for split in ("train", "val", "test")
        if split in per_class
    }


_CXR_WORK_WIDTH = 400  # anatomy is drawn at most this wide, then resized; noise is added at full size


def _cxr_field(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, spacing: float) -> np.ndarray:
    """Smooth unit-variance random field on the grid ``y`` × ``x`` (patient units), float32 (H, W)."""
    lo, hi = min(x.min(), y.min()) - spacing, max(x.max(), y.max()) + spacing
    n = _n_centres(spacing, hi - lo)
    return _smooth_field(rng.normal(size=(n, n)), [y - lo, x - lo], spacing, [hi - lo] * 2)


def _add_band(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    side: int,
    t_range: tuple[float, float],
    curve: Callable[[np.ndarray], np.ndarray],
    half_width: float,
    weight: Callable[[np.ndarray], np.ndarray | float],
) -> None:
    """Add a bone-like band along ``v = curve(t)`` to ``image`` in place, on one side of the midline.

    ``t`` is the distance from the midline (columns with ``side * x`` in ``t_range``); ``weight(t)``
    scales the band per column. Across the curve the profile is flat-topped, 1 on the curve and 0
    beyond ``half_width``, like the projection of a rib. Only the rows and columns the band reaches
    are computed, which keeps the two dozen ribs of a chest cheap.
    """
    columns = np.nonzero((side * x >= t_range[0]) & (side * x <= t_range[1]))[0]
    if len(columns) == 0:
        return
    cols = slice(columns[0], columns[-1] + 1)  # contiguous: x is monotonic
    t = side * x[cols]
    centre = curve(t)
    rows = slice(
        int(np.searchsorted(y, centre.min() - 2 * half_width)),
        int(np.searchsorted(y, centre.max() + 2 * half_width)),
    )
    d2 = ((y[rows, None] - centre[None, :]) / np.float32(half_width)) ** 2
    image[rows, cols] += weight(t) * np.exp(-(d2 * d2))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * z)  # tanh form: no overflow warnings far from 0


def _radial_ridges(rng: np.random.Generator, angle: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Thin lines radiating from a centre and slowly bending, thinning outwards: vessel markings."""
    table = np.linspace(-np.pi, np.pi, 4096, endpoint=False)
    terms = np.arange(6, 48)
    g = (rng.normal(size=len(terms)) / np.sqrt(terms)) @ np.cos(
        terms[:, None] * table[None, :] + rng.uniform(0, 2 * np.pi, len(terms))[:, None]
    )
    g /= g.std()
    bent = angle + 0.15 * np.sin(radius / 0.08 + rng.uniform(0, 2 * np.pi))
    wrapped = (bent + np.pi) % (2 * np.pi) - np.pi
    value = np.interp(wrapped, table, g, period=2 * np.pi)
    return np.exp(-((value / (0.25 + 0.3 * np.exp(-radius / 0.15))) ** 2)).astype(np.float32)


def chest_xray_phantom_image(
    seed: int, key: tuple[int, ...], kind: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one procedural chest radiograph.

    Parameters
    ----------
    seed : int
        Seed of the set.
    key : tuple of int
        Identifies the image within the set (split, class, number); the chest depends only on
        ``(seed, key)``.
    kind : {None, "bacteria", "virus"}
        None for a normal chest; otherwise the pattern of pneumonia: lobar consolidation (bacteria) or
        bilateral perihilar patchy opacities (virus). Opacities are drawn from their own stream, so the
        same key with and without pneumonia gives the same chest.

    Returns
    -------
    image : ndarray of uint8, shape (H, W)
        0–255, dense structures bright; W is 400–1000 px and H 0.72–1.05 × W.
    lungs : ndarray of bool, shape (H, W)
        The lung fields.
    """
    if kind not in (None, "bacteria", "virus"):
        raise ValueError(f"pneumonia kind must be None, 'bacteria' or 'virus', got {kind!r}")
    rng = np.random.default_rng([seed, *key])
    width = int(rng.integers(400, 1001))
    height = round(width * rng.uniform(0.72, 1.05))
    work = min(1.0, _CXR_WORK_WIDTH / width)
    w, h = round(width * work), round(height * work)
    scale = min(w, 1.1 * h) * rng.uniform(0.55, 0.75)  # pixels per patient unit
    x = ((np.arange(w) - w * rng.uniform(0.46, 0.54)) / scale).astype(np.float32)
    y = ((np.arange(h) - h * rng.uniform(0.4, 0.52)) / scale).astype(np.float32)
    X, Y = x[None, :], y[:, None]
    t = np.abs(x)  # distance from the midline, per column

    # Body: an elliptic cylinder (projected depth) widening from the neck over the shoulders.
    half_width = rng.uniform(0.5, 0.6)
    shoulder = rng.uniform(-0.7, -0.6)
    body_width = 0.18 + (half_width + 0.08 - 0.18) * _sigmoid((Y - shoulder) / 0.035)
    body_width = body_width - 0.03 * _sigmoid((Y - 0.5) / 0.1)
    body = np.sqrt(np.clip(1 - (X / body_width) ** 2, 0, None))
    density = 0.6 * body
    arms = rng.choice(["up", "down", "none"], p=[0.4, 0.4, 0.2])
    if arms != "none":  # children are often held with the arms raised beside the head
        arm_t = rng.uniform(0.3, 0.4) if arms == "up" else half_width + rng.uniform(0.12, 0.2)
        extent = _sigmoid((shoulder + 0.05 - Y) / 0.03) if arms == "up" else _sigmoid((Y - shoulder) / 0.03)
        arm = np.sqrt(np.clip(1 - ((np.abs(X) - arm_t) / 0.1) ** 2, 0, None)) * extent
        humerus = np.exp(-(((np.abs(X) - arm_t) / 0.035) ** 4)) * extent
        density = density + 0.5 * arm + 0.2 * humerus

    # Lungs: each row spans from the mediastinum to a lateral edge that rounds off at the apex; the
    # domes of the diaphragm cut them below, the right one (image left) higher, over the liver.
    apex = shoulder + rng.uniform(-0.02, 0.05)
    base = rng.uniform(0.3, 0.42)
    lung_air = np.zeros((h, w), np.float32)
    for side in (-1, 1):
        medial = rng.uniform(0.05, 0.08)
        lateral = half_width - rng.uniform(0.04, 0.08)
        span = (lateral - medial) * np.sqrt(np.clip((Y - apex) / (0.4 * (base - apex)), 0, 1))
        middle = medial + span / 2
        across = np.sqrt(np.clip(1 - ((t - middle) / (span / 2 + 1e-3)) ** 2, 0, None))
        dome_top = base - (0.0 if side == 1 else rng.uniform(0.02, 0.06))
        centre = (medial + lateral) / 2
        dome = dome_top + rng.uniform(0.1, 0.16) * np.clip(((t - centre) / (lateral - centre)) ** 2, 0, 1.3)
        below_dome = _sigmoid((dome[None, :] - Y) / 0.006)
        on_side = (np.sign(x) == side)[None, :]
        lung_air += (across * below_dome * on_side).astype(np.float32)

    # Heart and mediastinum replace lung; the heart bulges to the patient's left (image right).
    heart_u, heart_v = rng.uniform(0.1, 0.15), base - rng.uniform(0.04, 0.08)
    heart_a, heart_b = rng.uniform(0.21, 0.27), rng.uniform(0.16, 0.2)
    tilt = np.deg2rad(rng.uniform(-30, -15))
    hu = (X - heart_u) * np.cos(tilt) + (Y - heart_v) * np.sin(tilt)
    hv = -(X - heart_u) * np.sin(tilt) + (Y - heart_v) * np.cos(tilt)
    heart = np.sqrt(np.clip(1 - (hu / heart_a) ** 2 - (hv / heart_b) ** 2, 0, None))
    mediastinum = np.exp(-(((X - 0.02) / rng.uniform(0.1, 0.13)) ** 4)) * _sigmoid((heart_v - Y) / 0.03)
    knob = np.sqrt(np.clip(1 - ((X - 0.08) / 0.05) ** 2 - ((Y - heart_v + 0.3) / 0.05) ** 2, 0, None))
    lung_air *= np.clip(1 - 2.5 * heart - mediastinum - knob, 0, 1)
    lungs = lung_air > 0.15

    # Vessel markings: lines radiating from the hila, fading towards the periphery.
    vessels = np.zeros((h, w), np.float32)
    hila = []
    for side in (-1, 1):
        hx, hy = side * rng.uniform(0.1, 0.14), heart_v - rng.uniform(0.2, 0.26)
        hila.append((hx, hy))
        r = np.hypot(X - hx, Y - hy)
        vessels += (_radial_ridges(rng, np.arctan2(Y - hy, X - hx), r) * np.exp(-r / 0.3)) * (
            np.sign(x) == side
        )
    hilum_distance = np.minimum(*(np.hypot(X - hx, Y - hy) for hx, hy in hila))
    density = density - 0.45 * lung_air * (1 - 0.2 * vessels) + 0.08 * heart + 0.05 * knob
    density = density + 0.08 * mediastinum + 0.06 * np.exp(-hilum_distance / 0.06)

    spine = np.exp(-((X / 0.04) ** 4)) * (0.75 + 0.25 * np.cos(2 * np.pi * Y / rng.uniform(0.07, 0.09)))
    density = density + 0.05 * spine * body
    bones = _ribs_and_clavicles(rng, x, y, shoulder=shoulder, apex=apex, base=base, half_width=half_width)
    density = density + bones * body

    if rng.random() < 0.7:  # gastric air bubble under the left dome
        bubble = np.clip(1 - ((X - 0.2) / 0.08) ** 2 - ((Y - base - 0.08) / 0.045) ** 2, 0, None)
        density = density - 0.25 * np.sqrt(bubble)

    if kind is not None:
        opacity = _opacity(np.random.default_rng([seed, *key, 1]), kind, x, y, hilum_distance)
        density = density + 0.45 * opacity * lung_air

    pil = _expose(rng, density, (width, height), marker_size=max(12, round(0.07 * scale / work)))
    angle = rng.normal(0, 2.5)  # patients are rarely perfectly straight
    pil = pil.rotate(angle, resample=Image.BILINEAR)
    lungs = (
        Image.fromarray(lungs).resize((width, height), Image.NEAREST).rotate(angle, resample=Image.NEAREST)
    )
    return np.asarray(pil), np.asarray(lungs)


def _ribs_and_clavicles(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    *,
    shoulder: float,
    apex: float,
    base: float,
    half_width: float,
) -> np.ndarray:
    """Density of the clavicles, the posterior ribs (visible) and the anterior ribs (faint)."""
    bones = np.zeros((len(y), len(x)), np.float32)
    spacing = (base - apex + 0.1) / 10
    wall = half_width + 0.04

    def clavicle(t):
        return shoulder + 0.06 - 0.15 * t + 0.25 * (t - 0.2) ** 2

    # Posterior ribs leave the spine slightly upwards and bend down laterally; anterior ribs run down
    # and inwards from the chest wall.
    def posterior(v0, t):
        return v0 - 0.12 * t + 2.0 * np.clip(t - 0.2, 0, None) ** 2

    def anterior(v0, t):
        return v0 + 0.1 + 0.5 * (wall - t)

    def fade(strength):  # bones end at the chest wall
        return lambda t: strength * np.clip((wall - t) / 0.04, 0, 1)

    for side in (-1, 1):
        _add_band(bones, x, y, side, (0.04, wall), clavicle, rng.uniform(0.018, 0.024), fade(0.25))
        for k in range(11):
            v0 = apex - 0.04 + k * spacing
            rib = spacing * rng.uniform(0.22, 0.3)
            _add_band(bones, x, y, side, (0.04, wall), functools.partial(posterior, v0), rib, fade(0.14))
            _add_band(bones, x, y, side, (0.2, wall), functools.partial(anterior, v0), 0.012, fade(0.04))
    return bones


def _expose(
    rng: np.random.Generator, density: np.ndarray, size: tuple[int, int], *, marker_size: int
) -> Image.Image:
    """Film the projected density: attenuation, window, gamma, blur, resize to ``size``, noise, marker."""
    attenuation = 1 - np.exp(-rng.uniform(1.0, 1.8) * np.clip(density + 0.05, 0, None))
    lo, hi = np.percentile(attenuation, [1, 99.8])
    image = np.clip((attenuation - lo) / (hi - lo), 0, 1) ** rng.uniform(0.8, 1.3)
    image = ndi.gaussian_filter(image, rng.uniform(0.8, 1.5))
    image = np.asarray(Image.fromarray(image.astype(np.float32)).resize(size, Image.BICUBIC))
    image = image + rng.normal(0, rng.uniform(0.01, 0.03), image.shape)
    image = np.clip(image * rng.uniform(0.85, 1.0) + rng.uniform(0.0, 0.08), 0, 1)
    pil = Image.fromarray(np.rint(image * 255).astype(np.uint8))
    if rng.random() < 0.5:  # a side marker, as on most films
        corner = (int(size[0] * rng.uniform(0.03, 0.15)), int(size[1] * rng.uniform(0.03, 0.15)))
        font = ImageFont.load_default(size=marker_size)
        ImageDraw.Draw(pil).text(corner, "R", fill=int(rng.integers(200, 256)), font=font)
    return pil


def _opacity(
    rng: np.random.Generator, kind: str, x: np.ndarray, y: np.ndarray, hilum_distance: np.ndarray
) -> np.ndarray:
    """Pneumonia's added density, 0–1, before the caller restricts it to the lung fields."""
    X, Y = x[None, :], y[:, None]
    patches = _cxr_field(rng, x, y, 0.05)
    if kind == "bacteria":  # lobar consolidation: one or two dense, fairly confluent regions
        opacity = np.zeros(patches.shape, np.float32)
        for _ in range(rng.integers(1, 4)):
            u, v = rng.choice([-1, 1]) * rng.uniform(0.15, 0.35), rng.uniform(-0.25, 0.3)
            size = rng.uniform(0.12, 0.24, size=2)
            blob = np.exp(-(((X - u) / size[0]) ** 2) - ((Y - v) / size[1]) ** 2)
            opacity += np.clip(2.0 * blob + 0.5 * patches - 0.5, 0, 1)
        return rng.uniform(0.7, 1.0) * np.clip(opacity, 0, 1)
    # viral: bilateral, perihilar, streaky and patchy
    fine = _cxr_field(rng, x, y, 0.02)
    texture = np.clip(0.4 + 0.35 * patches + 0.25 * fine, 0, 1)
    return rng.uniform(0.6, 0.9) * np.exp(-hilum_distance / rng.uniform(0.25, 0.45)) * texture


def _cxr_plan(
    per_class: dict[str, tuple[int, int]], seed: int
) -> list[tuple[str, tuple[int, int, int], str | None]]:
    """Every image of a set: (path relative to the root, key, pneumonia kind or None).

    Names follow Kermany's: ``IM-0001-0001.jpeg`` for NORMAL, ``person<n>_<kind>_<m>.jpeg`` for
    PNEUMONIA (about two bacterial for each viral), numbered across splits in train, val, test order.
    """
    plan = []
    n_normal = n_pneumonia = 0
    per_kind = {"bacteria": 0, "virus": 0}
    for s, split in enumerate(("train", "val", "test")):
        if split not in per_class:
            continue
        normal, pneumonia = per_class[split]
        for i in range(normal):
            n_normal += 1
            plan.append((f"chest_xray/{split}/NORMAL/IM-{n_normal:04d}-0001.jpeg", (s, 0, i), None))
        for i in range(pneumonia):
            n_pneumonia += 1
            kind = "bacteria" if np.random.default_rng([seed, s, 1, i, 2]).random() < 2 / 3 else "virus"
            per_kind[kind] += 1
            name = f"person{n_pneumonia}_{kind}_{per_kind[kind]}.jpeg"
            plan.append((f"chest_xray/{split}/PNEUMONIA/{name}", (s, 1, i), kind))
    return plan


def _write_cxr_image(path: Path, seed: int, key: tuple[int, int, int], kind: str | None) -> None:
    image, _ = chest_xray_phantom_image(seed, key, kind)
    rng = np.random.default_rng([seed, *key, 3])
    pil = Image.fromarray(image)
    if rng.random() < 0.1:  # a few real files are RGB with equal channels
        pil = pil.convert("RGB")
    with atomic_path(path) as tmp:
        pil.save(tmp, format="JPEG", quality=int(rng.integers(85, 96)))


def write_cxr_phantom(
    root: str | os.PathLike,
    *,
    n_per_class: dict[str, tuple[int, int]] | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write a chest x-ray phantom in the Kermany (Kaggle "Chest X-Ray Images (Pneumonia)") layout.

    Parameters
    ----------
    root : path
        Folder to write into; created if needed.
    n_per_class : dict of str to (int, int), optional
        ``{split: (n_normal, n_pneumonia)}`` for splits among ``train``, ``val``, ``test``; default
        :data:`DEFAULT_CXR_PER_CLASS`.
    seed : int
        Seed of the set; each image depends only on the seed, its split, class and number.
    workers : int, optional
        Processes drawing images in parallel; default ``min(cpu_count, 4)``.
    progress : bool
        Show a progress bar.

    Returns
    -------
    Path
        ``root``, holding ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` (8-bit grayscale,
        about one in ten stored as RGB; 400–1000 px wide, not square) and ``COMPLETE.json``.

    Notes
    -----
    Existing images are skipped, so an interrupted run resumes and a deleted image is rewritten; every
    file is written atomically. ``COMPLETE.json`` (the parameters) is written last: a folder without
    it is unfinished.
    """
    root = Path(root)
    per_class = _check_per_class(n_per_class)
    params = {
        "generator": "cxr-phantom",
        "version": CXR_PHANTOM_VERSION,
        "seed": seed,
        "n_per_class": {split: list(n) for split, n in per_class.items()},
    }
    plan = _cxr_plan(per_class, seed)
    todo = [(root / rel, seed, key, kind) for rel, key, kind in plan if not (root / rel).is_file()]
    if not todo and _marker_matches(root, params):
        return root
    (root / COMPLETE_MARKER).unlink(missing_ok=True)
    log.info("cxr-phantom: %d of %d images to write under %s", len(todo), len(plan), root)
    _run_jobs(_write_cxr_image, todo, workers=workers, progress=progress, desc="cxr-phantom", unit="image")
    write_json(root / COMPLETE_MARKER, params)
    return root
