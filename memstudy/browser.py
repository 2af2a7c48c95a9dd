"""The static nearest-match browser: one self-contained HTML+JS component per run, no kernel needed.

A notebook displays :func:`match_browser_html` with ``IPython.display.HTML``; the executed notebook
keeps it as ``text/html``, so the book shows it offline. Everything is in the string: images as
lossless PNG data URIs (each image once, however often it is shown), the data as JSON, the code as
plain JavaScript, styles inline. Nothing is fetched.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math

import numpy as np
from PIL import Image

from memstudy.analysis.memorization import MemorizationReport
from memstudy.data import ImageSet
from memstudy.figures.images import display_channel, image_class, neighbour_slices, view

#: Synthetic images per page by default: with k = 5 and 2 neighbouring slices on each side, a page of
#: 64 px images stays under ~4 MB even when every shown image is different and incompressible.
DEFAULT_MAX_IMAGES = 64
ORDERS = ("max_r", "random")
_ECDF_WIDTH, _ECDF_HEIGHT = 240, 70


def png_data_uri(picture: np.ndarray) -> str:
    """A 2D uint8 picture (0–255) as a lossless grayscale PNG ``data:`` URI (base64)."""
    picture = np.asarray(picture)
    if picture.dtype != np.uint8 or picture.ndim != 2:
        raise ValueError(f"expected a 2D uint8 picture, got {picture.dtype} of shape {picture.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(picture)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _number(value: float, digits: int = 6) -> float | None:
    """A JSON-safe float: NaN (a constant image) becomes null."""
    return round(float(value), digits) if math.isfinite(value) else None


def shown_order(report: MemorizationReport, order: str, max_images: int, seed: int) -> np.ndarray:
    """The synthetic images a page shows, in order: the highest max r first (NaN last) or a seeded draw.

    Parameters
    ----------
    report : MemorizationReport
    order : {"max_r", "random"}
    max_images : int
        At most this many images (the page's cap).
    seed : int
        Seed of ``numpy.random.default_rng`` for ``"random"``.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    n = report.max_r.size
    if order == "random":
        return np.random.default_rng(seed).permutation(n)[:max_images]
    key = np.where(np.isfinite(report.max_r), -report.max_r, np.inf)
    return np.argsort(key, kind="stable")[:max_images]


def ecdf_svg(holdout: np.ndarray, threshold: float, low: float, *, marker: float | None = None) -> str:
    """An inline SVG of the held-out ECDF of max r on [low, 1], with the threshold and a marker.

    The marker line sits at ``marker`` (an r value) when given, else at the left edge for a script
    to move (the static browser does so as the reader steps through images).
    """
    values = np.sort(holdout[np.isfinite(holdout)])

    def x(r: float) -> float:
        return round((r - low) / (1 - low) * _ECDF_WIDTH, 2)

    top, bottom = 4, _ECDF_HEIGHT - 14
    points = [f"0,{bottom}"]
    for rank, value in enumerate(values, start=1):
        y = round(bottom - (bottom - top) * rank / values.size, 2)
        previous = points[-1].split(",")[1]
        points += [f"{x(value)},{previous}", f"{x(value)},{y}"]
    points.append(f"{_ECDF_WIDTH},{points[-1].split(',')[1]}")
    threshold_line = (
        f'<line x1="{x(threshold)}" x2="{x(threshold)}" y1="{top}" y2="{bottom}" class="msb-threshold"/>'
        if math.isfinite(threshold)
        else ""
    )
    at = x(marker) if marker is not None and math.isfinite(marker) else 0
    return (
        f'<svg class="msb-ecdf" width="{_ECDF_WIDTH}" height="{_ECDF_HEIGHT}" '
        f'viewBox="0 0 {_ECDF_WIDTH} {_ECDF_HEIGHT}" role="img">'
        f"<title>held-out → train max r (ECDF), calibrated threshold and this image</title>"
        f'<polyline points="{" ".join(points)}" class="msb-curve"/>{threshold_line}'
        f'<line x1="{at}" x2="{at}" y1="{top}" y2="{bottom}" class="msb-marker"/>'
        f'<text x="0" y="{_ECDF_HEIGHT - 2}">{low:.2f}</text>'
        f'<text x="{_ECDF_WIDTH}" y="{_ECDF_HEIGHT - 2}" text-anchor="end">1.00</text></svg>'
    )


def match_browser_html(
    report: MemorizationReport,
    synthetic: ImageSet | np.ndarray,
    training: ImageSet,
    *,
    k: int | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    order: str = "max_r",
    neighbours: int = 2,
    show_training_images: bool = True,
    seed: int = 0,
    title: str = "",
) -> str:
    """A self-contained HTML component to step through synthetic images and their nearest training images.

    Parameters
    ----------
    report : MemorizationReport
        The report of ``synthetic`` against ``training`` (:func:`memstudy.analysis.memorization_report`).
    synthetic : ImageSet or ndarray of uint8, shape (N, C, H, W) or (N, C, D, H, W)
        The synthetic images of the report (0–255).
    training : ImageSet
        The training set of the report (indices, names, groups and ``provenance["classes"]``).
    k : int, optional
        Matches shown per image (at most the report's k, which is the default).
    max_images : int
        The cap: at most this many synthetic images on the page (stated on the page).
    order : {"max_r", "random"}
        Which images fill the cap and their first order: the highest max r first, or a seeded random
        draw. The page can switch between the two orders of the images it holds.
    neighbours : int
        Slices on each side of the best match shown from the same subject (names like
        ``subject/z078``); none for images that are not slices.
    show_training_images : bool
        False (data under a use agreement) writes no training pixel into the page: matches and
        neighbouring slices are shown by provenance and r only.
    seed : int
        Seed of the random order (``numpy.random.default_rng``).
    title : str
        Heading of the component.

    Returns
    -------
    str
        An HTML fragment (a ``<div>`` with its own ``<style>`` and ``<script>``; no network, no CDN,
        no external file) for ``IPython.display.HTML`` or any page. Per image: the synthetic image,
        its top-k matches with r and provenance (name, subject, slice, class), the neighbouring
        slices of the best match, and its max r against the held-out ECDF (percentile and an SVG
        marker). Controls: slider, previous/next buttons, left/right arrow keys (when the component
        has focus), order. Images are shown at native resolution as PNG (lossless), scaled up with
        nearest-neighbour rendering, the report's channel (the first for all channels), middle slice
        of volumes.
    """
    images = synthetic.images if isinstance(synthetic, ImageSet) else np.asarray(synthetic)
    if len(images) != report.max_r.size:
        raise ValueError(f"synthetic has {len(images)} images but the report {report.max_r.size}")
    if len(training) != report.n_train_images:
        raise ValueError(
            f"training has {len(training)} images but the report was made with {report.n_train_images}"
        )
    report_k = report.match_values.shape[1]
    k = report_k if k is None else k
    if not 1 <= k <= report_k:
        raise ValueError(f"k must be between 1 and the report's k ({report_k}), got {k}")
    channel = display_channel(report.channel, training.channels)
    picked = shown_order(report, order, max_images, seed)
    pictures: dict[tuple[str, int], int] = {}
    uris: dict[str, int] = {}  # each distinct picture once (a copied image is its source's picture)

    def picture(kind: str, index: int, source: np.ndarray) -> int:
        if (kind, index) not in pictures:
            pictures[kind, index] = uris.setdefault(png_data_uri(view(source[index], channel)), len(uris))
        return pictures[kind, index]

    holdout = report.holdout_max_r[np.isfinite(report.holdout_max_r)]
    copies = set(report.likely_copies.tolist())
    items = []
    for i in picked.tolist():
        matches = []
        for rank in range(k):
            j = int(report.match_indices[i, rank])
            if j < 0:
                continue
            matches.append(
                {
                    "image": picture("t", j, training.images) if show_training_images else None,
                    "r": _number(report.match_values[i, rank]),
                    "name": training.names[j],
                    "subject": int(report.match_subjects[i, rank]),
                    "slice": int(report.match_slices[i, rank]) if report.match_slices[i, rank] >= 0 else None,
                    "class": image_class(training, j),
                }
            )
        best = int(report.match_indices[i, 0])
        near = [
            {
                "image": picture("t", n, training.images) if show_training_images else None,
                "name": training.names[n],
                "match": n == best,
            }
            for n in neighbour_slices(training, best, neighbours)
        ]
        max_r = report.max_r[i]
        items.append(
            {
                "index": i,
                "image": picture("s", i, images),
                "max_r": _number(max_r),
                "margin": _number(report.margin[i]),
                "percentile": _number(100 * np.mean(holdout <= max_r), 2)
                if holdout.size and math.isfinite(max_r)
                else None,
                "copy": i in copies,
                "transform": str(report.transform[i]),
                "matches": matches,
                "neighbours": near,
            }
        )
    finite = [r for r in (*holdout.tolist(), *report.max_r[picked].tolist()) if math.isfinite(r)]
    # The ECDF's r axis starts at a tenth below every value shown, and at 0.9 at the latest.
    low = min(0.9, math.floor(10 * min(finite)) / 10) if finite else 0.0
    data = {
        "images": list(uris),
        "items": items,
        "orders": {
            "max_r": np.argsort(
                [-(it["max_r"] if it["max_r"] is not None else -np.inf) for it in items], kind="stable"
            ).tolist(),
            "random": np.random.default_rng(seed).permutation(len(items)).tolist(),
        },
        "low": low,
        "threshold": _number(report.threshold),
        "marginThreshold": _number(report.margin_threshold),
        "quantile": report.quantile,
    }
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    uid = "msb-" + hashlib.sha1(payload.encode()).hexdigest()[:12]
    n = report.max_r.size
    cap = f"Showing {len(items)} of {n} synthetic images (cap: max_images={max_images}), " + (
        "those with the highest max r." if order == "max_r" else f"a random draw (seed {seed})."
    )
    privacy = (
        ""
        if show_training_images
        else '<p class="msb-note">Training images are not shown (show_training_images=False): '
        "matches appear by provenance and r only.</p>"
    )
    return _TEMPLATE.format(
        uid=uid,
        title=html.escape(title or f"Nearest training images ({report.channel})"),
        cap=html.escape(cap),
        privacy=privacy,
        last=max(len(items) - 1, 0),
        selected_max_r=" selected" if order == "max_r" else "",
        selected_random=" selected" if order == "random" else "",
        svg=ecdf_svg(report.holdout_max_r, report.threshold, low),
        quantile=f"{100 * report.quantile:g}",
        payload=payload,
        script=_SCRIPT.replace("__UID__", uid),
        style=STYLE,
    )


STYLE = """
.msb{font:13px/1.4 system-ui,sans-serif;border:1px solid #ccc;border-radius:6px;padding:10px;outline:none}
.msb:focus{border-color:#4a7bd0}
.msb h4{margin:0 0 4px}
.msb-note{margin:2px 0;color:#555}
.msb-controls{display:flex;gap:8px;align-items:center;flex-wrap:wrap;margin:6px 0}
.msb-slider{flex:1;min-width:160px}
.msb img{image-rendering:pixelated;display:block;background:#000}
.msb figure{margin:0;display:inline-block;vertical-align:top;text-align:center}
.msb figcaption{font-size:11px;max-width:140px;word-break:break-all}
.msb-main{display:flex;gap:16px;align-items:flex-start}
.msb-syn img{width:192px;height:auto}
.msb-row{display:flex;gap:8px;flex-wrap:wrap;margin:6px 0}
.msb-row img{width:128px;height:auto}
.msb-neighbours img{width:96px}
.msb-best img{outline:3px solid #d62728}
.msb-hidden{width:128px;min-height:60px;border:1px dashed #999;padding:4px;font-size:11px;
  word-break:break-all}
.msb-copy{color:#d62728;font-weight:bold}
.msb-ecdf .msb-curve{fill:none;stroke:#1f77b4;stroke-width:1.5}
.msb-ecdf .msb-threshold{stroke:#888;stroke-dasharray:4 3}
.msb-ecdf .msb-marker{stroke:#d62728;stroke-width:2}
.msb-ecdf text{font-size:10px;fill:#555}
"""

_TEMPLATE = """<div class="msb" id="{uid}" tabindex="0">
<style>{style}</style>
<h4>{title}</h4>
<p class="msb-note">{cap}</p>{privacy}
<div class="msb-controls">
<button type="button" class="msb-prev">&#9664; previous</button>
<input type="range" class="msb-slider" min="0" max="{last}" value="0" step="1" aria-label="image">
<button type="button" class="msb-next">next &#9654;</button>
<span class="msb-pos"></span>
<label>order <select class="msb-order"><option value="max_r"{selected_max_r}>max r, highest first</option>
<option value="random"{selected_random}>random</option></select></label>
</div>
<div class="msb-main">
<figure class="msb-syn"><img class="msb-syn-img" alt="synthetic image">
<figcaption class="msb-syn-cap"></figcaption></figure>
<div class="msb-stats">
<div class="msb-r"></div>
<div class="msb-margin"></div>
<div class="msb-pct"></div>
{svg}
<div class="msb-note">held-out → train max r (ECDF); dashed: calibrated threshold
(held-out p{quantile}); red: this image</div>
</div>
</div>
<div><b>Top training matches</b></div>
<div class="msb-row msb-matches"></div>
<div><b>Neighbouring slices of the best match</b></div>
<div class="msb-row msb-neighbours"></div>
<script type="application/json" class="msb-data">{payload}</script>
<script>{script}</script>
</div>"""

_SCRIPT = """
(function () {
  "use strict";
  const root = document.getElementById("__UID__");
  const data = JSON.parse(root.querySelector(".msb-data").textContent);
  const $ = (selector) => root.querySelector(selector);
  const slider = $(".msb-slider");
  const svg = $(".msb-ecdf");
  const width = svg.viewBox.baseVal.width;
  let order = data.orders[$(".msb-order").value];
  let position = 0;
  const fmt = (r) => (r === null ? "undefined (constant image)" : r.toFixed(4));
  const element = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const tile = (image, lines, className) => {
    const box = image === null ? element("div", "msb-hidden " + className) : element("figure", className);
    if (image !== null) {
      const img = element("img");
      img.src = data.images[image];
      img.alt = lines[0];
      box.appendChild(img);
    }
    const caption = element(image === null ? "div" : "figcaption");
    lines.forEach((line, i) => {
      if (i) caption.appendChild(element("br"));
      caption.appendChild(document.createTextNode(line));
    });
    box.appendChild(caption);
    return box;
  };
  const render = () => {
    const item = data.items[order[position]];
    if (!item) return;
    slider.value = String(position);
    $(".msb-pos").textContent = (position + 1) + " / " + data.items.length;
    const img = $(".msb-syn-img");
    img.src = data.images[item.image];
    img.dataset.index = String(item.index);
    $(".msb-syn-cap").textContent = "synthetic #" + item.index;
    const r = $(".msb-r");
    const how = item.transform === "identity" ? "" : " (" + item.transform + ")";
    r.textContent = "max r = " + fmt(item.max_r) + how;
    if (item.copy) r.appendChild(element("span", "msb-copy", " likely copy"));
    $(".msb-margin").textContent = "margin to other subjects = " + fmt(item.margin) +
      " (threshold " + fmt(data.marginThreshold) + ")";
    $(".msb-pct").textContent = item.percentile === null ? "no held-out comparison" :
      "at or above " + item.percentile.toFixed(1) + " % of held-out images' max r" +
      " (threshold " + fmt(data.threshold) + ")";
    const marker = svg.querySelector(".msb-marker");
    const x = item.max_r === null ? -10 : (item.max_r - data.low) / (1 - data.low) * width;
    marker.setAttribute("x1", x);
    marker.setAttribute("x2", x);
    const matches = $(".msb-matches");
    matches.replaceChildren(...item.matches.map((m, rank) => {
      const where = ["subject " + m.subject];
      if (m.slice !== null) where.push("slice " + m.slice);
      if (m.class !== null) where.push("class " + m.class);
      const kind = rank === 0 ? "msb-match msb-best" : "msb-match";
      return tile(m.image, ["r = " + fmt(m.r), m.name, where.join(", ")], kind);
    }));
    const neighbours = $(".msb-neighbours");
    neighbours.replaceChildren(...(item.neighbours.length ? item.neighbours.map((n) =>
      tile(n.image, [n.name + (n.match ? " (best match)" : "")], n.match ? "msb-best" : "")) :
      [element("div", "msb-note", "none: these images are not slices of volumes")]));
  };
  const go = (to) => {
    position = Math.max(0, Math.min(data.items.length - 1, to));
    render();
  };
  slider.addEventListener("input", () => go(Number(slider.value)));
  $(".msb-prev").addEventListener("click", () => go(position - 1));
  $(".msb-next").addEventListener("click", () => go(position + 1));
  $(".msb-order").addEventListener("change", (event) => {
    order = data.orders[event.target.value];
    go(0);
  });
  root.addEventListener("keydown", (event) => {
    if (event.target === slider || event.target.tagName === "SELECT") return;
    if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
      go(position + (event.key === "ArrowRight" ? 1 : -1));
      event.preventDefault();
    }
  });
  render();
})();
"""
