"""The brain MRI phantom: MNI152-based subjects written in the BraTS 2020 layout.

It resamples the real MNI152 2009a T1 template and its grey/white-matter maps (shipped in nilearn's
wheel) through a per-subject random deformation, synthesizes T2, FLAIR and T1ce contrasts from the
tissue maps, plants a tumour with the BraTS labels (1 necrotic/non-enhancing core, 2 edema, 4 enhancing
rim) and varies gain, bias field and noise per subject. Like real volumes, adjacent axial slices of one
subject are near-duplicates while subjects differ. Randomness comes from ``(seed, index)`` alone.

The computation is float64 without BLAS or LAPACK (fixed-order sums, :mod:`memstudy.data.phantom_tools`),
so a subject is bit-identical whatever the number of workers or threads and the BLAS kernel; float64
leaves enough margin that the last-bit differences of ``exp``/``log`` between CPUs' SIMD code paths do not
reach the rounded int16 voxels.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from memstudy.atomic import atomic_open, atomic_path, write_json
from memstudy.data.phantom_tools import (
    COMPLETE_MARKER,
    inverse3,
    marker_matches,
    matmul,
    n_centres,
    run_jobs,
    smooth_field,
)

log = logging.getLogger(__name__)

# Bump the version whenever the generator's output changes: it is part of the cache folder name.
# 2: float64 and fixed-order sums (version 1 depended on the BLAS kernel and thread count).
BRAIN_PHANTOM_VERSION = 2
DEFAULT_N_SUBJECTS = 32

BRATS_SHAPE = (240, 240, 155)
BRATS_DIR = "MICCAI_BraTS2020_TrainingData"
SEQUENCES = ("t1", "t1ce", "t2", "flair")

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


@dataclass(frozen=True)
class _Template:
    """The MNI152 template, cropped to the brain, as float64 arrays in template voxel coordinates."""

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

    t1 = load_mni152_template(resolution=1).get_fdata(dtype=np.float64)
    gm = load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float64)
    wm = load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float64)
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
        offset=start.astype(np.float64),
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
    return matmul(matmul(rz, ry), rx)


def _subject_params(seed: int, index: int, template: _Template) -> _SubjectParams:
    rng = np.random.default_rng([seed, index])
    # Global pose and size: the output grid samples the template at linear @ (p - centre), with p in
    # output voxels; voxel axes 0 and 1 run right-to-left and anterior-to-posterior (LPS, as BraTS).
    size = np.exp(rng.normal(0.0, 0.04)) * np.exp(rng.normal(0.0, 0.03, size=3))
    angles = np.deg2rad(rng.uniform(-1, 1, size=3) * np.array([8.0, 5.0, 10.0]))
    flip = np.diag([-1.0, -1.0, 1.0])
    linear = matmul(matmul(_rotation(angles), np.diag(1.0 / size)), flip)
    shift = rng.normal(0.0, [4.0, 4.0, 3.0])
    n = n_centres(_DEFORM_SPACING, max(BRATS_SHAPE))
    displacement = rng.normal(0.0, 5.0, size=(3, n, n, n))  # mm of smooth local warping

    grade = _subject_grade(seed, index)
    tumour_centre = template.tumour_sites[rng.integers(len(template.tumour_sites))].astype(float)
    tumour_axes = matmul(np.diag(1.0 / rng.uniform(0.8, 1.2, size=3)), _rotation(rng.uniform(0, np.pi, 3)))
    core_radius = rng.uniform(7.0, _MAX_CORE_RADIUS)
    if grade == "LGG" or rng.random() < 0.1:
        necrosis_fraction = 0.0
    else:
        necrosis_fraction = rng.uniform(0.3, 0.75)
    edema_factor = rng.uniform(1.4, _MAX_EDEMA_FACTOR) if grade == "HGG" else rng.uniform(1.2, 1.8)
    mass_effect = rng.uniform(0.15, 0.55)
    ventricle_growth = rng.uniform(-0.15, 0.35)
    n_shape = n_centres(_SHAPE_SPACING, _TUMOUR_EXTENT)
    shape_coefficients = rng.normal(size=(2, n_shape, n_shape, n_shape))
    n_texture = n_centres(_TEXTURE_SPACING, _TUMOUR_EXTENT)
    texture_coefficients = rng.normal(size=(n_texture, n_texture, n_texture))

    t1_gamma = rng.uniform(0.8, 1.25)
    tissue_signal = {s: tuple(v * rng.uniform(0.92, 1.08) for v in sig) for s, sig in _TISSUE_SIGNAL.items()}
    tumour_signal = {
        s: {c: v * rng.uniform(0.9, 1.1) for c, v in sig.items()} for s, sig in _TUMOUR_SIGNAL.items()
    }
    n_bias = n_centres(_BIAS_SPACING, max(BRATS_SHAPE))
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
    offsets = [axis[b] - c for axis, b, c in zip(axes, box, centre, strict=True)]
    return tuple(box), offsets


def _pull(coords: np.ndarray, offsets: list[np.ndarray], linear: np.ndarray, strength: float, radius: float):
    """Pull sampling coordinates towards the centre of ``offsets``, in place: tissue there looks larger.

    The radial map r -> r (1 - k exp(-r^2 / R^2)) is monotonic for -2 < k < 1, so no tissue folds;
    a negative ``strength`` k shrinks the tissue instead.
    """
    r2 = offsets[0][:, None, None] ** 2 + offsets[1][None, :, None] ** 2 + offsets[2][None, None, :] ** 2
    pull = strength * np.exp(-r2 / radius**2)
    for d in range(3):
        coords[d] -= pull * (
            linear[d, 0] * offsets[0][:, None, None]
            + linear[d, 1] * offsets[1][None, :, None]
            + linear[d, 2] * offsets[2][None, None, :]
        )


def _output_box(params: _SubjectParams, template: _Template, centre: np.ndarray) -> tuple[slice, ...]:
    """Output voxels that can show brain: the template's brain box mapped back, plus warp margin."""
    inverse = inverse3(params.linear)
    corners = np.array(
        [
            [lo if bit else hi for bit, lo, hi in zip(bits, template.lower, template.upper, strict=True)]
            for bits in np.ndindex(2, 2, 2)
        ],
        dtype=float,
    )
    mapped = matmul(corners - _TEMPLATE_CENTRE, inverse.T) + centre
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
    coords = np.empty((3, *box_shape))
    relative = [a - c for a, c in zip(axes, centre, strict=True)]
    for d in range(3):
        coords[d] = (
            params.linear[d, 0] * relative[0][:, None, None]
            + params.linear[d, 1] * relative[1][None, :, None]
            + params.linear[d, 2] * relative[2][None, None, :]
        )
        # one displacement component at a time keeps the float64 temporaries small
        coords[d] += smooth_field(params.displacement[d], axes, _DEFORM_SPACING, [max(BRATS_SHAPE)] * 3)
        coords[d] += _TEMPLATE_CENTRE[d] - template.offset[d]
    inverse = inverse3(params.linear)
    ventricles_out = matmul(inverse, (_VENTRICLE_CENTRE - _TEMPLATE_CENTRE)[:, None])[:, 0] + centre
    vbox, voffset = _sub_box(axes, ventricles_out, 60)
    _pull(coords[(slice(None), *vbox)], voffset, params.linear, params.ventricle_growth, 30.0)
    # Where the tumour sits on the output grid (ignoring the small local warp).
    tumour_out = matmul(inverse, (params.tumour_centre - _TEMPLATE_CENTRE)[:, None])[:, 0] + centre
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
    axes = [np.arange(b.start, b.stop, dtype=np.float64) for b in box]
    box_shape = tuple(len(a) for a in axes)

    def sample(volume: np.ndarray, points: np.ndarray) -> np.ndarray:
        return ndi.map_coordinates(volume, points, order=1, mode="constant", cval=0.0, output=np.float64)

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
    bias = smooth_field(params.bias_coefficients, axes, _BIAS_SPACING, [max(BRATS_SHAPE)] * 3).ravel()[brain]
    images = {}
    for s, sequence in enumerate(SEQUENCES):
        if sequence == "t1":
            # a power keeps white matter (about 0.85) in place and varies the grey/white contrast
            signal = 0.85 * (t1 / 0.85) ** params.t1_gamma
        else:
            grey, white, fluid = params.tissue_signal[sequence]
            signal = grey * gm + white * wm + fluid * csf
        tumour_signal = sum(params.tumour_signal[sequence][c] * w for c, w in tumour_weights.items())
        signal[where] = signal[where] * (1.0 - tumour_total) + tumour_signal * (1.0 + 0.2 * texture)
        signal *= np.exp(params.bias_strength[s] * bias)
        signal += noise_rng.standard_normal(len(brain)) * params.noise[s]
        np.clip(signal * params.scale[s], 0.0, None, out=signal)
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
    shape = smooth_field(params.shape_coefficients, local, _SHAPE_SPACING, [_TUMOUR_EXTENT] * 3)
    texture = smooth_field(params.texture_coefficients, local, _TEXTURE_SPACING, [_TUMOUR_EXTENT] * 3)
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
    weights = {c: ndi.gaussian_filter(m.astype(np.float64), 0.7) * mask for c, m in classes.items()}
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
    if not todo and marker_matches(root, params):
        return root
    (root / COMPLETE_MARKER).unlink(missing_ok=True)
    log.info("brain-phantom: %d of %d subjects to write under %s", len(todo), n_subjects, root)
    run_jobs(
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
