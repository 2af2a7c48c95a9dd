"""Plotly figures as HTML that renders in the offline book (and nothing else a page would need)."""

from __future__ import annotations

#: The plotly renderer the notebooks register and make the default.
PLOTLY_RENDERER = "memstudy_offline"


def use_offline_plotly_renderer() -> None:
    """Make plotly figures display as HTML that renders in the offline book.

    Registers the renderer ``"memstudy_offline"`` with :mod:`plotly.io` and makes it the default. Safe to
    call any number of times; notebooks call it once in their imports cell (it returns nothing, so the
    cell shows no output).

    Notes
    -----
    Under papermill plotly picks its ``plotly_mimetype`` renderer, whose output myst-nb drops with only
    a warning. This renderer emits ``text/html`` alone, without plotly.js or MathJax: the book loads the
    vendored ``plotly.min.js`` once per page. Adding the plotly mimetype for live JupyterLab sessions is
    not possible, because myst-nb warns about it (which fails the ``-W`` build) even beside the HTML; so
    in a live session, where no page-wide plotly.js exists, these figures stay blank (use
    ``memstudy.widgets`` or plotly's own renderers there).
    """
    import plotly.io as pio
    from plotly.io.base_renderers import MimetypeRenderer

    class OfflineHtmlRenderer(MimetypeRenderer):
        def to_mimebundle(self, fig_dict: dict) -> dict:
            html = pio.to_html(
                fig_dict,
                full_html=False,
                include_plotlyjs=False,
                include_mathjax=False,
                default_width="100%",
                # As plotly's notebook renderers: an output cell has no height to take 100% of.
                default_height=525,
                validate=False,
            )
            return {"text/html": html}

    if PLOTLY_RENDERER not in pio.renderers:
        pio.renderers[PLOTLY_RENDERER] = OfflineHtmlRenderer()
    pio.renderers.default = PLOTLY_RENDERER
