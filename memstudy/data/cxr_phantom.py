"""The chest x-ray phantom: procedural radiographs written in the Kermany layout.

Independent images (body outline, lungs, heart, mediastinum, ribs, clavicles, diaphragm) in the NORMAL
and PNEUMONIA classes, the latter with patchy opacities. Randomness comes from ``(seed, index)`` alone.
Computed in float64 without BLAS (fixed-order sums), so an image does not depend on the thread count,
the number of workers or the BLAS kernel.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

from memstudy.atomic import atomic_path, write_json
from memstudy.data.phantom_tools import (
    COMPLETE_MARKER,
    marker_matches,
    matmul,
    n_centres,
    run_jobs,
    smooth_field,
)

log = logging.getLogger(__name__)

# Bump the version whenever the generator's output changes: it is part of the cache folder name.
# 2: float64 and fixed-order sums (version 1 depended on the BLAS kernel and thread count).
CXR_PHANTOM_VERSION = 2
DEFAULT_CXR_PER_CLASS: dict[str, tuple[int, int]] = {"train": (200, 300), "val": (8, 8), "test": (50, 50)}


def check_per_class(n_per_class: dict[str, tuple[int, int]] | None) -> dict[str, tuple[int, int]]:
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
    """Smooth unit-variance random field on the grid ``y`` × ``x`` (patient units), float64 (H, W)."""
    lo, hi = min(x.min(), y.min()) - spacing, max(x.max(), y.max()) + spacing
    n = n_centres(spacing, hi - lo)
    return smooth_field(rng.normal(size=(n, n)), [y - lo, x - lo], spacing, [hi - lo] * 2)


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
    d2 = ((y[rows, None] - centre[None, :]) / half_width) ** 2
    image[rows, cols] += weight(t) * np.exp(-(d2 * d2))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * z)  # tanh form: no overflow warnings far from 0


def _radial_ridges(rng: np.random.Generator, angle: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Thin lines radiating from a centre and slowly bending, thinning outwards: vessel markings."""
    table = np.linspace(-np.pi, np.pi, 4096, endpoint=False)
    terms = np.arange(6, 48)
    waves = np.cos(terms[:, None] * table[None, :] + rng.uniform(0, 2 * np.pi, len(terms))[:, None])
    g = matmul((rng.normal(size=len(terms)) / np.sqrt(terms))[None, :], waves)[0]
    g /= g.std()
    bent = angle + 0.15 * np.sin(radius / 0.08 + rng.uniform(0, 2 * np.pi))
    wrapped = (bent + np.pi) % (2 * np.pi) - np.pi
    value = np.interp(wrapped, table, g, period=2 * np.pi)
    return np.exp(-((value / (0.25 + 0.3 * np.exp(-radius / 0.15))) ** 2))


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
    x = (np.arange(w) - w * rng.uniform(0.46, 0.54)) / scale
    y = (np.arange(h) - h * rng.uniform(0.4, 0.52)) / scale
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
    lung_air = np.zeros((h, w), np.float64)
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
        lung_air += (across * below_dome * on_side).astype(np.float64)

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
    vessels = np.zeros((h, w), np.float64)
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
    bones = np.zeros((len(y), len(x)), np.float64)
    spacing = (base - apex + 0.1) / 10
    wall = half_width + 0.04

    def clavicle(t: np.ndarray) -> np.ndarray:
        return shoulder + 0.06 - 0.15 * t + 0.25 * (t - 0.2) ** 2

    # Posterior ribs leave the spine slightly upwards and bend down laterally; anterior ribs run down
    # and inwards from the chest wall.
    def posterior(v0: float, t: np.ndarray) -> np.ndarray:
        return v0 - 0.12 * t + 2.0 * np.clip(t - 0.2, 0, None) ** 2

    def anterior(v0: float, t: np.ndarray) -> np.ndarray:
        return v0 + 0.1 + 0.5 * (wall - t)

    def fade(strength: float) -> Callable[[np.ndarray], np.ndarray]:  # bones end at the chest wall
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
    image = np.asarray(Image.fromarray(image.astype(np.float32)).resize(size, Image.BICUBIC), np.float64)
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
        opacity = np.zeros(patches.shape, np.float64)
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
    per_class = check_per_class(n_per_class)
    params = {
        "generator": "cxr-phantom",
        "version": CXR_PHANTOM_VERSION,
        "seed": seed,
        "n_per_class": {split: list(n) for split, n in per_class.items()},
    }
    plan = _cxr_plan(per_class, seed)
    todo = [(root / rel, seed, key, kind) for rel, key, kind in plan if not (root / rel).is_file()]
    if not todo and marker_matches(root, params):
        return root
    (root / COMPLETE_MARKER).unlink(missing_ok=True)
    log.info("cxr-phantom: %d of %d images to write under %s", len(todo), len(plan), root)
    run_jobs(_write_cxr_image, todo, workers=workers, progress=progress, desc="cxr-phantom", unit="image")
    write_json(root / COMPLETE_MARKER, params)
    return root
