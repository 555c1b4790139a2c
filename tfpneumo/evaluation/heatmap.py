"""The evaluation heatmap: pooled OOF score over top x min_area of the triplet rule (PNG)."""

from __future__ import annotations

import io

import numpy as np

from tfpneumo.drawing import font
from tfpneumo.evaluation.search import SearchResult, describe_best, image_side

_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98),
                     (253, 231, 37)], np.float64)


def _colour(value: float) -> tuple[int, int, int]:
    """A viridis-like colour for ``value`` in [0, 1]."""
    x = min(max(value, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(x), len(_VIRIDIS) - 2)
    rgb = _VIRIDIS[i] + (x - i) * (_VIRIDIS[i + 1] - _VIRIDIS[i])
    return tuple(int(round(c)) for c in rgb)


def render_heatmap(result: SearchResult, pixels: int) -> bytes:
    """PNG bytes: pooled score over top (rows) x min_area (columns) at the best bottom.

    When the best triplet has ``bottom = top`` the slice is the ``bottom = top`` diagonal,
    else the fixed best bottom (cells with top < bottom are grey). The best triplet's cell
    is framed in red; each cell shows its score. Colours run from the all-empty score (or
    the lowest cell, if higher) to the best cell.
    """
    from PIL import Image, ImageDraw

    g = result.grids
    trip = result.best_triplet()
    diagonal = trip["bottom_bin"] == trip["top_bin"]
    if diagonal:
        grid = np.stack([result.triplet[t, :, np.searchsorted(g.edges, top)]
                         for t, top in enumerate(g.tops)])
        slice_name = "bottom = top"
    else:
        grid = result.triplet[:, :, int(np.searchsorted(g.edges, trip["bottom_bin"]))]
        slice_name = f"bottom = {trip['bottom']:.4f}"
    best_cell = (int(np.searchsorted(g.tops, trip["top_bin"])),
                 int(np.searchsorted(g.min_areas, trip["min_area"])))

    title, small = font(14), font(12)
    cell_w, cell_h = 64, 24
    n_rows, n_cols = grid.shape
    left, top_margin, right, bottom_margin = 110, 70, 110, 60
    width = left + n_cols * cell_w + right
    height = top_margin + n_rows * cell_h + bottom_margin
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    # the colours span [all-empty score, best]: worse cells are all bad, and the contrast
    # goes where the choice is made
    floor = result.empty_score if lo < result.empty_score < hi else lo
    span = hi - floor if hi > floor else 1.0
    for r in range(n_rows):
        for c in range(n_cols):
            x0, y0 = left + c * cell_w, top_margin + r * cell_h
            value = grid[r, c]
            if np.isfinite(value):
                fill = _colour((value - floor) / span)
                text = f"{value:.4f}"
            else:
                fill, text = (200, 200, 200), "-"
            draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], fill=fill)
            ink = "black" if sum(fill) > 400 else "white"
            draw.text((x0 + cell_w / 2, y0 + cell_h / 2), text, fill=ink, font=small, anchor="mm")
    r, c = best_cell
    x0, y0 = left + c * cell_w, top_margin + r * cell_h
    draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], outline=(230, 20, 20), width=3)

    for r, top in enumerate(g.tops.tolist()):  # row labels: top thresholds
        draw.text((left - 8, top_margin + r * cell_h + cell_h / 2), f"{top / g.bins:.4f}",
                  fill="black", font=small, anchor="rm")
    for c, area in enumerate(g.min_areas.tolist()):  # column labels: min areas
        draw.text((left + c * cell_w + cell_w / 2, top_margin - 6), str(area), fill="black",
                  font=small, anchor="md")
    draw.text((left - 8, top_margin - 6), "top \\ min_area", fill="black", font=small,
              anchor="rd")
    draw.text((10, 10), f"pooled OOF score, triplet rule, {slice_name}", fill="black", font=title)
    draw.text((10, 30), f"best (red): {describe_best(trip, pixels)}; all-empty "
              f"{result.empty_score:.4f}", fill="black", font=small)
    grid_bottom = top_margin + n_rows * cell_h
    draw.text((left, grid_bottom + 8), f"min_area in pixels of the {_size_text(pixels)} "
              "cached images; top = threshold of the gate", fill="black", font=small)

    bar_x = left + n_cols * cell_w + 20  # colour bar
    bar_h = max(n_rows * cell_h, 40)
    for i in range(bar_h):
        draw.line([bar_x, top_margin + i, bar_x + 14, top_margin + i],
                  fill=_colour(1 - i / max(bar_h - 1, 1)))
    draw.text((bar_x + 18, top_margin), f"{hi:.4f}", fill="black", font=small, anchor="lt")
    low_text = f"{floor:.4f}" if floor == lo else f"<= {floor:.4f}\n(all-empty)"
    draw.multiline_text((bar_x + 18, top_margin + bar_h), low_text, fill="black", font=small,
                        anchor="ld")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _size_text(pixels: int) -> str:
    side = image_side(pixels)
    return f"{side}x{side}" if side else f"{pixels}-pixel"
