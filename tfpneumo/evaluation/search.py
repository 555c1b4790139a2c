"""The out-of-fold rule search: every rule of a grid scored from the histograms alone.

The competition score is the mean over images of Dice, with Dice = 1 when prediction and
truth are both empty, so a false positive on an empty image costs a whole point. The rules
(:mod:`tfpneumo.evaluation.rules`) are scored on :class:`~tfpneumo.evaluation.oof.OofStats`:
the triplet over tops x min areas x bottoms (``bottom = top`` is always tried), the label rule
over label thresholds x mask thresholds, and the plain rule (a triplet with ``min_area = 0``
and ``bottom = top``) over the mask thresholds. A winning plain threshold is written as that
triplet, so a best rule is always ``"triplet"`` or ``"label"``.

Pixel thresholds are snapped to the histogram bin edges ``k / 256`` (``k = ceil(256 t)``)
and a pixel counts as above the edge when ``floor(256 prob) >= k``, which is
``prob >= k / 256``: exactly what the histograms can score. The snapped values are the ones
reported. Label thresholds act on the exact ``label_prob`` and are not snapped.

For each image the tail sums of ``hist_all`` and ``hist_true`` give, for every edge, the
predicted area and the intersection; the score of every (top, min_area, bottom) follows from
one cumulative sum per top over the images sorted by their count above the top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tfpneumo.evaluation.oof import OofStats, counts_above, dice

# Default min-area grid as fractions of the image area. The 1st place searched 800-3000 px
# at 1024^2 (0.08-0.3 %); the grid spans 0-0.5 % so the optimum is rarely on its border.
MIN_AREA_FRACTIONS = (0.0, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.003,
                      0.004, 0.005)


def area_grid(min_areas: Literal["auto"] | np.ndarray, pixels: int) -> np.ndarray:
    """Min areas in pixels, (A,) int64; ``"auto"`` = :data:`MIN_AREA_FRACTIONS` of ``pixels``."""
    if isinstance(min_areas, str):
        return np.unique(np.round(np.array(MIN_AREA_FRACTIONS) * pixels).astype(np.int64))
    return np.unique(np.asarray(min_areas, np.int64))


def snap(thresholds: np.ndarray, bins: int) -> np.ndarray:
    """Pixel thresholds in [0, 1] -> sorted unique bin edges ``ceil(bins * t)``, (K,) int64.

    Edge ``k`` means "pixel in bin >= k", i.e. ``prob >= k / bins``; ``k = bins`` is never.
    The 1e-9 keeps 0.5 (exactly 128 / 256) on 128 despite float error in the grid.
    """
    edges = np.ceil(np.asarray(thresholds, np.float64) * bins - 1e-9).astype(np.int64)
    return np.unique(np.clip(edges, 0, bins))


@dataclass(frozen=True)
class Grids:
    """The searched parameters: pixel thresholds as bin edges, areas in pixels."""

    bins: int
    tops: np.ndarray  # (T,) int64 bin edges
    min_areas: np.ndarray  # (A,) int64 pixels
    bottoms: np.ndarray  # (Bo,) int64 bin edges (bottom = top is tried besides these)
    label_thresholds: np.ndarray  # (L,) float64

    @property
    def edges(self) -> np.ndarray:
        """Every pixel threshold scored: tops and bottoms, (E,) int64 sorted."""
        return np.union1d(self.tops, self.bottoms)

    def to_json(self) -> dict:
        return {
            "bins": self.bins,
            "top": [k / self.bins for k in self.tops.tolist()],
            "min_area": self.min_areas.tolist(),
            "bottom": [k / self.bins for k in self.bottoms.tolist()],
            "label_threshold": [round(t, 10) for t in self.label_thresholds.tolist()],
        }



# ----------------------------------------------------------------------------- search

@dataclass(frozen=True)
class SearchResult:
    """Scores of every rule on one set of images (means over images of the competition Dice).

    triplet (T, A, E) float64 over grids.tops x grids.min_areas x grids.edges, NaN where the
    combination is not searched (bottom > top, or bottom neither in the bottom grid nor = top);
    label (L, E) over label thresholds x edges; plain (E,) over edges.
    """

    grids: Grids
    n_images: int
    empty_score: float
    triplet: np.ndarray
    label: np.ndarray
    plain: np.ndarray

    def best_triplet(self) -> dict:
        t, a, e = np.unravel_index(_argmax(self.triplet), self.triplet.shape)
        g = self.grids
        return _rule("triplet", g, top=g.tops[t], min_area=g.min_areas[a], bottom=g.edges[e],
                     score=self.triplet[t, a, e])

    def best_label(self) -> dict:
        lt, e = np.unravel_index(_argmax(self.label), self.label.shape)
        g = self.grids
        return _rule("label", g, bottom=g.edges[e], label_threshold=g.label_thresholds[lt],
                     score=self.label[lt, e])

    def best_plain(self) -> dict:
        e = _argmax(self.plain)
        return _rule("triplet", self.grids, top=self.grids.edges[e], min_area=0,
                     bottom=self.grids.edges[e], score=self.plain[e])


def _argmax(scores: np.ndarray) -> int:
    """Flat index of the best score; ties (to 1e-12: summation order) go to the first index."""
    return int(np.argmax(np.where(np.isnan(scores), -np.inf, np.round(scores, 12))))


def _rule(kind: str, grids: Grids, *, score: float, top: int | None = None,
          min_area: int | None = None, bottom: int | None = None,
          label_threshold: float | None = None) -> dict:
    """A rule as JSON: thresholds as floats (snapped) and as bin edges."""
    return {
        "rule": kind,
        "top": None if top is None else int(top) / grids.bins,
        "top_bin": None if top is None else int(top),
        "min_area": None if min_area is None else int(min_area),
        "bottom": None if bottom is None else int(bottom) / grids.bins,
        "bottom_bin": None if bottom is None else int(bottom),
        "label_threshold": None if label_threshold is None else round(float(label_threshold), 10),
        "score": float(score),
    }


def search(stats: OofStats, grids: Grids) -> SearchResult:
    """Scores every rule of ``grids`` on ``stats`` from the histograms alone.

    A gate "score_i >= x" (count above the top, or the label probability) calls a prefix of
    the images sorted by score positive, so the summed Dice of the positives for every x is
    one row of a cumulative sum: O(N log N + N * E) per top, no BLAS (whose threads only
    slow these thin products down on a shared CPU), O(N * E) float64 memory.
    """
    n = len(stats)
    edges = grids.edges
    truth = stats.hist_true.sum(axis=1, dtype=np.int64)  # (N,)
    empty = (truth == 0).astype(np.float64)  # score of calling the image empty
    pred = counts_above(stats.hist_all, edges)  # (N, E)
    inter = counts_above(stats.hist_true, edges)
    dice_e = dice(pred, inter, truth[:, None])  # (N, E): Dice if the image is called positive

    def gated(score: np.ndarray, cuts: np.ndarray, strict: bool) -> np.ndarray:
        """Mean Dice, (K, E), when image i is positive iff score_i >= cut (> cut if strict)."""
        order = np.argsort(-score, kind="stable")
        gain = np.zeros((n + 1, dice_e.shape[1]))  # gain[k]: sum over the top-k images
        np.cumsum(dice_e[order] - empty[order, None], axis=0, out=gain[1:])
        ascending = score[order[::-1]]
        n_pos = n - np.searchsorted(ascending, cuts, side="right" if strict else "left")
        return (empty.sum() + gain[n_pos]) / n

    top_pos = np.searchsorted(edges, grids.tops)  # column of each top in `edges`
    triplet = np.stack([gated(pred[:, c], grids.min_areas, strict=False) for c in top_pos])
    in_bottoms = np.isin(edges, grids.bottoms)
    valid = (edges[None, :] <= grids.tops[:, None]) & (
        in_bottoms[None, :] | (edges[None, :] == grids.tops[:, None]))  # (T, E)
    triplet[~np.broadcast_to(valid[:, None, :], triplet.shape)] = np.nan
    label = gated(stats.label_prob.astype(np.float64), grids.label_thresholds, strict=True)
    return SearchResult(grids=grids, n_images=n, empty_score=float(empty.mean()),
                        triplet=triplet, label=label, plain=dice_e.mean(axis=0))




def image_side(pixels: int) -> int | None:
    """The side of a square image of ``pixels`` pixels, or None when it is not square."""
    side = math.isqrt(pixels)
    return side if side * side == pixels else None


def describe_best(rule: dict, pixels: int) -> str:
    """One line for a searched rule in its JSON form (see :func:`_rule`), with its score."""
    if rule["rule"] == "triplet":
        share = 100 * rule["min_area"] / pixels
        text = (f"triplet top={rule['top']:.4f} min_area={rule['min_area']} px "
                f"({share:.3g}% of the image) bottom={rule['bottom']:.4f}")
    else:
        text = f"label t={rule['label_threshold']:g} bottom={rule['bottom']:.4f}"
    if rule.get("merge", "mean") != "mean":
        text += f", {rule['merge']} of the TTA members"
    return f"{text} -> {rule['score']:.4f}"
