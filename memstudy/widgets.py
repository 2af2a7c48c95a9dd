"""The live explorer: a run's synthetic images, or an uploaded PNG, matched on the fly in JupyterLab.

:func:`explore_run` returns an ipywidgets box: pick a synthetic image by index or upload a PNG,
choose the channel, k and the transforms (mirror, shifts), and see the exact top-k training matches
(:func:`memstudy.correlate.topk_pearson`, through the analysis' own matching) with the panels of
the static browser (:mod:`memstudy.browser`): the image, its matches with r and provenance, the
neighbouring slices of the best match, and where its max r falls against the held-out baseline.
The panels are rendered in Python as plain HTML (a widget runs no script), so they need a kernel.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np

from memstudy.analysis.memorization import SearchCost, SetMatches, match_set
from memstudy.analysis.transforms import check_shift, transform_list
from memstudy.browser import STYLE, ecdf_svg, png_data_uri
from memstudy.correlate.exclude import slice_positions
from memstudy.data import ImageSet
from memstudy.data.image_files import ImageFileError, read_gray
from memstudy.figures.images import image_class, neighbour_slices, view
from memstudy.models.runs import SAMPLES_DIR, dataset_fingerprint, read_params

ALL_CHANNELS = "all"
#: Matches offered at most by the k control (the panel shows one tile per match).
MAX_K = 20


def run_training_set(
    run_dir: str | os.PathLike, training: ImageSet | str | os.PathLike | None = None
) -> ImageSet:
    """The training ImageSet of a run, checked against the fingerprint in its ``params.json``.

    Parameters
    ----------
    run_dir : path
        A training run folder (``params.json``).
    training : ImageSet, path or None
        The training set, or a saved ImageSet folder. None reopens the cache entry recorded in
        ``params.json`` (``dataset.provenance.cache_dir``), which holds the run's training set when
        the run trained on a dataset as loaded (not on a subset of it).

    Returns
    -------
    ImageSet

    Raises
    ------
    FileNotFoundError
        No ``params.json``, or no recorded cache entry on this machine.
    ValueError
        The images are not the ones the run trained on (their fingerprint differs).
    """
    params = read_params(run_dir)
    recorded = params.get("dataset", {})
    if training is None:
        cache = recorded.get("provenance", {}).get("cache_dir")
        if not cache or not (Path(cache) / "meta.json").is_file():
            raise FileNotFoundError(
                f"{run_dir}: params.json names no training set on this machine (cache_dir={cache!r}); "
                "pass training= (an ImageSet or a saved ImageSet folder)"
            )
        training = cache
    if not isinstance(training, ImageSet):
        training = ImageSet.load(training)
    if recorded.get("fingerprint") not in (None, dataset_fingerprint(training)):
        raise ValueError(
            f"{run_dir}: these are not the images the run trained on (fingerprint "
            f"{dataset_fingerprint(training)}, params.json records {recorded['fingerprint']}; "
            f"{len(training)} images of shape {training.image_shape}, the run had "
            f"{params.get('n_images')} of {tuple(params.get('image_shape', ()))})"
        )
    return training


def run_sample_sets(run_dir: str | os.PathLike) -> dict[str, Path]:
    """The run's sample folders (``samples/step_NNNNNNNN-seedS/`` written by ``memstudy sample``), by name."""
    folder = Path(run_dir) / SAMPLES_DIR
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if (p / "meta.json").is_file()}


def match_image(
    image: np.ndarray,
    training: ImageSet,
    *,
    channel: int | None = None,
    k: int = 5,
    mirror: bool = False,
    max_shift: int = 0,
) -> SetMatches:
    """Exact top-k training matches of one image, best over the transforms, and its margin.

    Parameters
    ----------
    image : ndarray of uint8, shape (C, H, W) or (C, D, H, W); or (H, W) with ``channel`` set
        The query (0–255): a synthetic image, or one channel of an uploaded picture.
    training : ImageSet
        The training set (``groups`` tell subjects apart for the margin).
    channel : int or None
        Correlate this channel only (the paper's way), or all channels together.
    k : int
        Matches kept.
    mirror, max_shift : bool, int
        Also score the image mirrored and shifted by up to ``max_shift`` pixels, as
        :func:`memstudy.analysis.memorization_report` does.

    Returns
    -------
    SetMatches
        One row: the same matching the memorization report uses (and so the same r, indices,
        transform and margin it would give this image).
    """
    check_shift(max_shift, training.image_shape)
    if not 1 <= k <= len(training):
        raise ValueError(f"k={k} must be between 1 and the number of training images ({len(training)})")
    image = np.asarray(image)
    train = training.images if channel is None else training.images[:, channel]
    query = image if channel is None or image.ndim == train.ndim - 1 else image[channel]
    if query.shape != train.shape[1:]:
        raise ValueError(f"the image has shape {image.shape}; the training images {training.image_shape}")
    transforms = transform_list(mirror=mirror, max_shift=max_shift)
    return match_set(query[None], train, training.groups, k, transforms, SearchCost())


def decode_upload(content: bytes, name: str, training: ImageSet, channel: int | None) -> np.ndarray:
    """An uploaded PNG or JPEG as the query for ``channel``: uint8 ``(H, W)``, 0–255.

    Colour pictures become luminance (:func:`memstudy.data.image_files.read_gray`).

    Raises
    ------
    ValueError
        The file is not a readable 8-bit image, its size differs from the training images', the
        training images are volumes, or they have several channels and none is chosen.
    """
    shape = training.image_shape
    if len(shape) != 3:
        raise ValueError(f"{name}: the training images are volumes {shape}; an upload can only be 2D")
    if channel is None and shape[0] > 1:
        raise ValueError(
            f"{name}: an upload is one grayscale picture but the training images have {shape[0]} "
            f"channels {training.channels}; choose one channel"
        )
    try:
        picture = read_gray(Path(name), content)
    except ImageFileError as error:
        raise ValueError(f"{name}: {error.reason}") from error
    if picture.shape != shape[1:]:
        height, width = picture.shape
        raise ValueError(
            f"{name} is {width}×{height} pixels; the training images are {shape[2]}×{shape[1]} "
            "(width×height): upload a picture of their size"
        )
    return picture


def _r(value: float) -> str:
    return "undefined (constant image)" if not math.isfinite(value) else f"{value:.4f}"


def _tile(picture: np.ndarray | None, lines: list[str], css: str, **data: Any) -> str:
    """One figure of the browser's panels, or a dashed box of provenance when the pixels are withheld."""
    attributes = "".join(f' data-{key}="{html.escape(str(value))}"' for key, value in data.items())
    caption = "<br>".join(html.escape(line) for line in lines)
    if picture is None:
        return f'<div class="msb-hidden {css}"{attributes}><div>{caption}</div></div>'
    return (
        f'<figure class="{css}"{attributes}><img src="{png_data_uri(picture)}" alt="{html.escape(lines[0])}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _baseline_svg(holdout_max_r: np.ndarray, threshold: float, max_r: float) -> str:
    """The browser's held-out ECDF with this image's marker placed (the browser moves it by script)."""
    finite = [r for r in (*holdout_max_r[np.isfinite(holdout_max_r)].tolist(), max_r) if math.isfinite(r)]
    low = min(0.9, math.floor(10 * min(finite)) / 10) if finite else 0.0
    return ecdf_svg(holdout_max_r, threshold, low, marker=max_r)


def panels_html(
    query: np.ndarray,
    caption: str,
    matches: SetMatches,
    training: ImageSet,
    *,
    shown_channel: int,
    baseline: dict[str, Any] | None = None,
    neighbours: int = 2,
    show_training_images: bool = True,
    cost: str = "",
) -> str:
    """The static browser's panels for one query, as plain HTML (no script).

    Parameters
    ----------
    query : ndarray of uint8, shape (C, H, W), (C, D, H, W) or (H, W)
        The image shown as the query.
    caption : str
        Its caption (``synthetic #12 (step_00000100-seed0)`` or the upload's name).
    matches : SetMatches
        One row, from :func:`match_image`.
    training : ImageSet
    shown_channel : int
        The training channel shown (the searched one, or the first when all are searched).
    baseline : dict, optional
        ``holdout_max_r``, ``threshold``, ``margin_threshold``, ``quantile``: the held-out baseline.
    neighbours : int
        Slices on each side of the best match shown from its subject.
    show_training_images : bool
        False writes no training pixel: matches and neighbours by provenance and r only.
    cost : str
        A line stating what the search cost.

    Returns
    -------
    str
        A ``<div class="msb">`` with the browser's styles. Match tiles carry ``data-index`` (training
        index) and ``data-r`` (r as stored, full precision) for tests and readers of the HTML.
    """
    picture = query if query.ndim == 2 else view(query, shown_channel if query.shape[0] > 1 else 0)
    max_r, margin = float(matches.max_r[0]), float(matches.margin[0])
    how = "" if matches.transform[0] == "identity" else f" ({matches.transform[0]})"
    stats = [f'<div class="msb-r">max r = {_r(max_r)}{html.escape(how)}']
    if baseline is not None:
        copy = max_r > baseline["threshold"] and margin > baseline["margin_threshold"]
        stats[0] += '<span class="msb-copy"> likely copy</span>' if copy else ""
    stats[0] += "</div>"
    margin_line = f"margin to other subjects = {_r(margin)}"
    if baseline is None:
        stats += [
            f'<div class="msb-margin">{margin_line}</div>',
            '<div class="msb-pct">no held-out comparison (pass holdout=)</div>',
        ]
    else:
        held = baseline["holdout_max_r"][np.isfinite(baseline["holdout_max_r"])]
        where = (
            f"at or above {100 * np.mean(held <= max_r):.1f} % of held-out images' max r"
            if held.size and math.isfinite(max_r)
            else "no held-out comparison"
        )
        stats += [
            f'<div class="msb-margin">{margin_line} (threshold {_r(baseline["margin_threshold"])})</div>',
            f'<div class="msb-pct">{where} (threshold {_r(baseline["threshold"])})</div>',
            _baseline_svg(baseline["holdout_max_r"], baseline["threshold"], max_r),
            '<div class="msb-note">held-out → train max r (ECDF); dashed: calibrated threshold '
            f"(held-out p{100 * baseline['quantile']:g}); red: this image</div>",
        ]
    if cost:
        stats.append(f'<div class="msb-note">{html.escape(cost)}</div>')

    positions = slice_positions(training.names)
    tiles = []
    for rank, (j, r) in enumerate(zip(matches.indices[0].tolist(), matches.values[0].tolist(), strict=True)):
        if j < 0:
            continue
        where = [f"subject {training.groups[j]}"]
        if positions is not None:
            where.append(f"slice {positions[j]}")
        if (kind := image_class(training, j)) is not None:
            where.append(f"class {kind}")
        shown = view(training.images[j], shown_channel) if show_training_images else None
        css = "msb-match msb-best" if rank == 0 else "msb-match"
        tiles.append(
            _tile(shown, [f"r = {_r(r)}", training.names[j], ", ".join(where)], css, index=j, r=repr(r))
        )
    best = int(matches.indices[0, 0])
    near = [
        _tile(
            view(training.images[n], shown_channel) if show_training_images else None,
            [training.names[n] + (" (best match)" if n == best else "")],
            "msb-best" if n == best else "",
            index=n,
        )
        for n in neighbour_slices(training, best, neighbours)
    ] or ['<div class="msb-note">none: these images are not slices of volumes</div>']
    privacy = (
        ""
        if show_training_images
        else '<p class="msb-note">Training images are not shown (show_training_images=False): '
        "matches appear by provenance and r only.</p>"
    )
    return (
        f'<div class="msb"><style>{STYLE}</style>{privacy}<div class="msb-main">'
        f'<figure class="msb-syn"><img class="msb-syn-img" src="{png_data_uri(picture)}" alt="query">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        f'<div class="msb-stats">{"".join(stats)}</div></div>'
        f'<div><b>Top training matches</b></div><div class="msb-row msb-matches">{"".join(tiles)}</div>'
        f"<div><b>Neighbouring slices of the best match</b></div>"
        f'<div class="msb-row msb-neighbours">{"".join(near)}</div></div>'
    )


def explore_run(
    run_dir: str | os.PathLike,
    *,
    training: ImageSet | str | os.PathLike | None = None,
    holdout: ImageSet | str | os.PathLike | None = None,
    samples: ImageSet | str | os.PathLike | None = None,
    channel: int | str | None = None,
    k: int = 5,
    mirror: bool = False,
    max_shift: int = 0,
    neighbours: int = 2,
    quantile: float = 0.99,
    show_training_images: bool = True,
) -> widgets.VBox:
    """A live nearest-match explorer of one training run, for JupyterLab.

    Parameters
    ----------
    run_dir : path
        The run folder (``params.json``; samples in ``samples/*/`` from ``memstudy sample``).
    training : ImageSet, path or None
        The run's training images (see :func:`run_training_set`: None reopens the cache entry
        recorded in ``params.json``); checked against the run's dataset fingerprint.
    holdout : ImageSet, path or None
        Real images of unseen subjects (or a saved ImageSet folder): the baseline that max r is
        placed against and the calibrated copy call (as in the memorization report). None: no
        baseline is shown.
    samples : ImageSet, path or None
        The synthetic images to browse; None offers every sample folder of the run.
    channel : int, str or None
        The channel searched at first (None: all channels together); the widget can change it.
    k, mirror, max_shift : int, bool, int
        First values of the controls: matches shown, score the mirrored image, shifts of up to
        ``max_shift`` pixels.
    neighbours : int
        Slices on each side of the best match shown from its subject.
    quantile : float
        Quantile of the held-out values that calibrates the copy call.
    show_training_images : bool
        False (data under a use agreement) puts no training pixel into the widget: matches and
        neighbouring slices appear by provenance and r only.

    Returns
    -------
    ipywidgets.VBox
        The explorer. ``controls`` (a dict: ``set``, ``source``, ``index``, ``index_text``,
        ``upload``, ``channel``, ``k``, ``mirror``, ``max_shift``), ``panel`` (the HTML of the
        panels) and ``message`` (what is wrong with an upload or a setting) are attributes of the
        box, so a notebook or a test can drive it. Every change searches again. In the page, the box
        has the CSS class ``memstudy-explorer``, the panels ``memstudy-explorer-panel``, the message
        ``memstudy-explorer-message``, the image slider ``memstudy-explorer-index`` and its number box
        ``memstudy-explorer-index-text``.
    """
    training = run_training_set(run_dir, training)
    if holdout is not None and not isinstance(holdout, ImageSet):
        holdout = ImageSet.load(holdout)
    if isinstance(samples, ImageSet):
        sets: dict[str, ImageSet | Path] = {"samples": samples}
    elif samples is not None:
        sets = {Path(samples).name: Path(samples)}
    else:
        sets = dict(run_sample_sets(run_dir))
    opened: dict[str, ImageSet] = {}

    def sample_set(name: str) -> ImageSet:
        if name not in opened:
            found = sets[name] if isinstance(sets[name], ImageSet) else ImageSet.load(sets[name])
            if found.image_shape != training.image_shape or found.channels != training.channels:
                raise ValueError(
                    f"samples {name}: images {found.image_shape} with channels {found.channels}, but the "
                    f"training images are {training.image_shape} with {training.channels}"
                )
            opened[name] = found
        return opened[name]

    channels = (ALL_CHANNELS, *training.channels)
    first_channel = ALL_CHANNELS if channel is None else channel
    if isinstance(first_channel, int):
        first_channel = training.channels[first_channel]
    if first_channel not in channels:
        raise ValueError(f"channel={channel!r}: the training set has channels {training.channels}")
    check_shift(max_shift, training.image_shape)
    max_k = min(MAX_K, len(training))
    if not 1 <= k <= max_k:
        raise ValueError(f"k={k} must be between 1 and {max_k}")
    controls = {
        "set": widgets.Dropdown(options=list(sets), description="samples"),
        "source": widgets.ToggleButtons(
            options=["sample", "upload"], value="sample" if sets else "upload", description="query"
        ),
        "index": widgets.IntSlider(min=0, max=0, description="image", continuous_update=False),
        "index_text": widgets.BoundedIntText(min=0, max=0, layout=widgets.Layout(width="90px")),
        "upload": widgets.FileUpload(accept=".png,.jpg,.jpeg", multiple=False, description="PNG"),
        "channel": widgets.Dropdown(options=channels, value=first_channel, description="channel"),
        "k": widgets.BoundedIntText(value=k, min=1, max=max_k, description="k"),
        "mirror": widgets.Checkbox(value=mirror, description="mirror"),
        "max_shift": widgets.BoundedIntText(
            value=max_shift, min=0, max=(min(training.image_shape[-2:]) - 1) // 2, description="max shift"
        ),
    }
    widgets.link((controls["index"], "value"), (controls["index_text"], "value"))
    message = widgets.HTML()
    panel = widgets.HTML()
    baselines: dict[tuple, dict[str, Any]] = {}

    def baseline(c: int | None, flip: bool, shift: int) -> dict[str, Any] | None:
        # Held-out images scored like the query (same channel and transforms), once per setting.
        if holdout is None:
            return None
        if (c, flip, shift) not in baselines:
            pick = holdout.images if c is None else holdout.images[:, c]
            train = training.images if c is None else training.images[:, c]
            held = match_set(
                pick,
                train,
                training.groups,
                min(5, len(training)),
                transform_list(mirror=flip, max_shift=shift),
                SearchCost(),
            )

            def q(values: np.ndarray) -> float:
                finite = values[np.isfinite(values)]
                return float(np.quantile(finite, quantile)) if finite.size else math.nan

            baselines[c, flip, shift] = {
                "holdout_max_r": held.max_r,
                "threshold": q(held.max_r),
                "margin_threshold": q(held.margin),
                "quantile": quantile,
            }
        return baselines[c, flip, shift]

    def set_changed(_: Any = None) -> None:
        if sets:
            last = len(sample_set(controls["set"].value)) - 1
            controls["index_text"].max = controls["index"].max = max(last, 0)

    def refresh(_: Any = None) -> None:
        name = controls["channel"].value
        c = None if name == ALL_CHANNELS else training.channels.index(name)
        shown = 0 if c is None else c
        try:
            if controls["source"].value == "upload":
                files = controls["upload"].value
                if not files:
                    raise ValueError("upload a PNG of the training images' size (or choose query: sample)")
                upload = files[-1]
                query = decode_upload(bytes(upload["content"]), upload["name"], training, c)
                caption = f"upload {upload['name']}"
            else:
                if not sets:
                    raise ValueError(f"{run_dir}: no sample sets in {SAMPLES_DIR}/; upload a PNG")
                index = controls["index"].value
                query = np.asarray(sample_set(controls["set"].value).images[index])
                caption = f"synthetic #{index} ({controls['set'].value})"
            flip, shift = controls["mirror"].value, controls["max_shift"].value
            found = match_image(
                query, training, channel=c, k=controls["k"].value, mirror=flip, max_shift=shift
            )
            n_transforms = len(transform_list(mirror=flip, max_shift=shift))
            cost = (
                f"{n_transforms} exact search(es) of {len(training)} training images "
                f"({n_transforms * len(training)} pairs); channel {name}"
            )
            html_text = panels_html(
                query,
                caption,
                found,
                training,
                shown_channel=shown,
                baseline=baseline(c, flip, shift),
                neighbours=neighbours,
                show_training_images=show_training_images,
                cost=cost,
            )
        except ValueError as error:
            message.value = f'<p class="msb-note" style="color:#d62728">{html.escape(str(error))}</p>'
            panel.value = ""
            return
        message.value = ""
        panel.value = html_text

    def uploaded(_: Any = None) -> None:
        if controls["source"].value == "upload":
            refresh()
        else:
            controls["source"].value = "upload"  # observed: refreshes

    def new_set(_: Any = None) -> None:
        set_changed()
        refresh()

    set_changed()
    controls["set"].observe(new_set, names="value")
    for key in ("source", "index", "channel", "k", "mirror", "max_shift"):
        controls[key].observe(refresh, names="value")
    controls["upload"].observe(uploaded, names="value")
    refresh()
    box = widgets.VBox(
        [
            widgets.HBox([controls["source"], controls["set"]]),
            widgets.HBox([controls["index"], controls["index_text"], controls["upload"]]),
            widgets.HBox([controls["channel"], controls["k"], controls["mirror"], controls["max_shift"]]),
            message,
            panel,
        ]
    )
    # Stable classes for readers of the page (the live browser test finds the explorer by them).
    box.add_class("memstudy-explorer")
    panel.add_class("memstudy-explorer-panel")
    message.add_class("memstudy-explorer-message")
    controls["index"].add_class("memstudy-explorer-index")
    controls["index_text"].add_class("memstudy-explorer-index-text")
    box.controls, box.panel, box.message = controls, panel, message
    return box
