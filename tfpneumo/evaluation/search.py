"""``tfpneumo evaluate``: out-of-fold search of the rule that turns probabilities into masks.

The competition score is the mean over images of Dice, with Dice = 1 when prediction and
truth are both empty, so a false positive on an empty image costs a whole point. Three
rules are scored on the out-of-fold statistics of ``tfpneumo train``
(``runs/<experiment>/fold_<k>/oof.npz``, see :mod:`tfpneumo.inference.ensemble`):

triplet (1st place)
    the image is positive if ``count(prob >= top) >= min_area``; its mask is
    ``prob >= bottom`` (``bottom <= top``); ``bottom = top`` is always tried.
label (classification head)
    the image is positive if ``label_prob > t``; its mask is ``prob >= bottom``.
plain
    the mask is ``prob >= t`` (for reference; a triplet with ``min_area = 0``).

The label rule's mask threshold and the plain threshold range over the tops and the bottoms.
The ``best`` rule is the one with the highest pooled score; a winning plain threshold is
written as the equivalent triplet (``min_area = 0``, ``bottom = top``), so ``best.rule`` is
always ``"triplet"`` or ``"label"``.

Pixel thresholds are snapped to the histogram bin edges ``k / 256`` (``k = ceil(256 t)``)
and a pixel counts as above the edge when ``floor(256 prob) >= k``, which is
``prob >= k / 256``: exactly what the histograms can score. The snapped values are the ones
reported. Label thresholds act on the exact ``label_prob`` and are not snapped.

The search never sees a probability map. For each image the tail sums of ``hist_all`` and
``hist_true`` give, for every edge, the predicted area and the intersection; the score of
every (top, min_area, bottom) follows from one cumulative sum per top over the images
sorted by their count above the top (see :func:`search`).

Outputs in ``runs/<experiment>/`` (or ``out``): ``evaluation.json`` (everything, plus the
chosen ``best`` rule that ``tfpneumo submit`` reads), ``evaluation_images.csv`` (one row per
OOF image under the best rule) and ``evaluation_heatmap.png`` (pooled score over top x
min_area at the best bottom).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfpneumo import TfpneumoError
from tfpneumo.config import Config

# Default min-area grid as fractions of the image area. The 1st place searched 800-3000 px
# at 1024^2 (0.08-0.3 %); the grid spans 0-0.5 % so the optimum is rarely on its border.
MIN_AREA_FRACTIONS = (0.0, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.003,
                      0.004, 0.005)
MAX_GRID = 10_000  # a guard against "0:1:1e-9" eating the memory
OOF_KEYS = ("image_id", "label_prob", "has_mask", "hist_all", "hist_true", "pixels")

EVALUATION_JSON = "evaluation.json"
IMAGES_CSV = "evaluation_images.csv"
HEATMAP_PNG = "evaluation_heatmap.png"


# ----------------------------------------------------------------------------- grids

def parse_grid(text: str, name: str) -> np.ndarray:
    """A grid option: ``"start:stop[:step]"`` (stop included, step 0.05) or ``"0.3,0.5"``.

    Returns the sorted unique values, (K,) float64, rounded to 10 decimals so that float
    error in ``start + i * step`` never drops the stop (``0.3:0.6`` ends on 0.6) nor creates
    near-duplicates. Malformed text raises :class:`TfpneumoError` naming ``name`` and ``text``.
    """
    raw = str(text).strip()

    def fail(problem: str) -> TfpneumoError:
        return TfpneumoError(f"{name} {text!r}: {problem}")

    def number(part: str) -> float:
        try:
            value = float(part)
        except ValueError:
            raise fail(f"{part.strip()!r} is not a number") from None
        if not math.isfinite(value):
            raise fail(f"{part.strip()!r} is not a finite number")
        return value

    if not raw:
        raise fail("empty; expected start:stop[:step] or a comma list like 0.3,0.5")
    if ":" in raw:
        if "," in raw:
            raise fail("use either start:stop[:step] or a comma list, not both")
        parts = raw.split(":")
        if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
            raise fail("expected start:stop or start:stop:step")
        start, stop = number(parts[0]), number(parts[1])
        step = number(parts[2]) if len(parts) == 3 else 0.05
        if step <= 0:
            raise fail("step must be > 0")
        if start > stop:
            raise fail("start must be <= stop")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > MAX_GRID:
            raise fail(f"{count} values; at most {MAX_GRID}")
        values = start + step * np.arange(count, dtype=np.float64)
    else:
        parts = raw.split(",")
        if not all(p.strip() for p in parts):
            raise fail("empty item in the comma list")
        if len(parts) > MAX_GRID:
            raise fail(f"{len(parts)} values; at most {MAX_GRID}")
        values = np.array([number(p) for p in parts], dtype=np.float64)
    return np.unique(np.round(values, 10))


def _probability_grid(text: str, name: str) -> np.ndarray:
    values = parse_grid(text, name)
    if values.min() < 0.0 or values.max() > 1.0:
        raise TfpneumoError(f"{name} {text!r}: values must be in [0, 1]")
    return values


def _area_grid(text: str, name: str, pixels: int) -> np.ndarray:
    """Min areas in pixels, (A,) int64; ``"auto"`` = :data:`MIN_AREA_FRACTIONS` of ``pixels``."""
    if str(text).strip().lower() == "auto":
        return np.unique(np.round(np.array(MIN_AREA_FRACTIONS) * pixels).astype(np.int64))
    values = parse_grid(text, name)
    if values.min() < 0 or not np.all(values == np.round(values)):
        raise TfpneumoError(f"{name} {text!r}: values must be whole pixel counts >= 0")
    return values.astype(np.int64)


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


# ----------------------------------------------------------------------------- statistics

@dataclass(frozen=True)
class OofStats:
    """Out-of-fold statistics of N images (several folds concatenated).

    image_id (N,) str, fold (N,) int64, label_prob (N,) float32, has_mask (N,) int8,
    hist_all and hist_true (N, bins) int32 (bin b = [b/bins, (b+1)/bins)), pixels (N,) int64.
    """

    image_id: np.ndarray
    fold: np.ndarray
    label_prob: np.ndarray
    has_mask: np.ndarray
    hist_all: np.ndarray
    hist_true: np.ndarray
    pixels: np.ndarray

    def __len__(self) -> int:
        return len(self.image_id)

    @property
    def bins(self) -> int:
        return self.hist_all.shape[1]

    def subset(self, index: np.ndarray) -> OofStats:
        return OofStats(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    @staticmethod
    def concat(parts: Sequence[OofStats]) -> OofStats:
        fields = OofStats.__dataclass_fields__
        return OofStats(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def load_oof(path: Path, fold: int) -> OofStats:
    """Reads and checks one ``oof.npz``; any problem is a one-line error naming the file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in OOF_KEYS if k not in data.files]
            if missing:
                raise TfpneumoError(f"{path}: not an OOF statistics file (missing {missing})")
            arrays = {k: data[k] for k in OOF_KEYS}
    except (OSError, ValueError, EOFError) as e:
        raise TfpneumoError(f"{path}: cannot read OOF statistics ({e})") from e
    hist_all, hist_true = arrays["hist_all"], arrays["hist_true"]
    n = len(arrays["image_id"])
    if n == 0:
        raise TfpneumoError(f"{path}: no images")
    if hist_all.ndim != 2 or hist_all.shape != hist_true.shape or hist_all.shape[0] != n:
        raise TfpneumoError(f"{path}: hist_all {hist_all.shape} and hist_true {hist_true.shape} "
                            f"must both be ({n}, bins)")
    for key in ("label_prob", "has_mask", "pixels"):
        if arrays[key].shape != (n,):
            raise TfpneumoError(f"{path}: {key} has shape {arrays[key].shape}, expected ({n},)")
    if np.any(hist_true > hist_all) or np.any(hist_true < 0):
        raise TfpneumoError(f"{path}: hist_true exceeds hist_all (corrupt statistics)")
    if np.any(hist_all.sum(axis=1, dtype=np.int64) != arrays["pixels"]):
        raise TfpneumoError(f"{path}: histogram sums differ from pixels (corrupt statistics)")
    return OofStats(
        image_id=arrays["image_id"].astype(str),
        fold=np.full(n, fold, np.int64),
        label_prob=arrays["label_prob"].astype(np.float32),
        has_mask=arrays["has_mask"].astype(np.int8),
        hist_all=hist_all.astype(np.int32),
        hist_true=hist_true.astype(np.int32),
        pixels=arrays["pixels"].astype(np.int64),
    )


def counts_above(hist: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Pixels in bins >= each edge: hist (N, bins) int, edges (K,) in [0, bins] -> (N, K) int64."""
    tail = np.cumsum(hist[:, ::-1], axis=1, dtype=np.int64)[:, ::-1]
    tail = np.concatenate([tail, np.zeros((len(hist), 1), np.int64)], axis=1)
    return tail[:, edges]


def dice(pred_area: np.ndarray, inter: np.ndarray, truth_area: np.ndarray) -> np.ndarray:
    """Competition Dice from areas (any matching shapes): 1 when both are empty. float64."""
    denom = pred_area + truth_area
    return np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1))


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


def apply_rule(stats: OofStats, rule: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-image predicted area (N,) int64 and Dice (N,) float64 under one rule (JSON form)."""
    truth = stats.hist_true.sum(axis=1, dtype=np.int64)
    bottom = np.array([rule["bottom_bin"]])
    pred = counts_above(stats.hist_all, bottom)[:, 0]
    inter = counts_above(stats.hist_true, bottom)[:, 0]
    if rule["rule"] == "triplet":
        positive = counts_above(stats.hist_all, np.array([rule["top_bin"]]))[:, 0] >= rule[
            "min_area"]
    elif rule["rule"] == "label":
        positive = stats.label_prob.astype(np.float64) > rule["label_threshold"]
    else:
        raise ValueError(f"unknown rule {rule['rule']!r}")
    pred = np.where(positive, pred, 0)
    return pred, dice(pred, np.where(positive, inter, 0), truth)


# ----------------------------------------------------------------------------- the command

def _requested_folds(run_root: Path, folds: str) -> list[int]:
    trained = sorted(int(m.group(1)) for p in run_root.glob("fold_*")
                     if (m := re.fullmatch(r"fold_(\d+)", p.name)) and (p / "result.json").exists())
    if str(folds).strip().lower() == "all":
        if not trained:
            raise TfpneumoError(f"no trained fold in {run_root} (no fold_<k>/result.json); "
                                "run tfpneumo train first")
        return trained
    try:
        wanted = sorted({int(x) for x in str(folds).split(",")})
    except ValueError:
        raise TfpneumoError(f"--folds {folds!r}: expected 'all' or fold indices like 0,2") from None
    for k in wanted:
        if k not in trained:
            raise TfpneumoError(f"fold {k} is not trained ({run_root / f'fold_{k}' / 'result.json'}"
                                f" missing); run tfpneumo train --fold {k}")
    return wanted


def evaluate(cfg: Config, *, folds: str = "all", thresholds: str = "0.3:0.8",
             min_areas: str = "auto", bottoms: str = "0.2:0.5:0.1",
             label_thresholds: str = "0.3:0.8:0.1", workdir: Path = Path("."),
             out: Path | None = None) -> str:
    """Searches the triplet, label and plain rules on the OOF statistics of ``folds``.

    ``thresholds`` are the triplet tops, ``bottoms`` the triplet mask thresholds (``bottom =
    top`` is always tried too); the label rule's mask threshold and the plain threshold range
    over both lists. ``min_areas`` are pixels at the cached resolution or ``auto``
    (fractions :data:`MIN_AREA_FRACTIONS` of the image); ``label_thresholds`` act on the
    classification head. Writes evaluation.json, the per-image CSV and the heatmap into
    ``out`` (default ``runs/<experiment>/``) and returns the printed table.
    """
    run_root = Path(workdir) / "runs" / cfg.experiment
    tops_f = _probability_grid(thresholds, "--thresholds")
    bottoms_f = _probability_grid(bottoms, "--bottoms")
    labels_f = _probability_grid(label_thresholds, "--label-thresholds")
    if str(min_areas).strip().lower() != "auto":
        _area_grid(min_areas, "--min-areas", 0)  # reject bad text before reading any file
    fold_ids = _requested_folds(run_root, folds)

    parts, models = [], {}
    for k in fold_ids:
        path = run_root / f"fold_{k}" / "oof.npz"
        if not path.exists():
            raise TfpneumoError(f"{path}: missing although result.json exists; "
                                f"rerun tfpneumo train --fold {k}")
        parts.append(load_oof(path, k))
        models[k] = _oof_model(path)
    stats = OofStats.concat(parts)
    if len({p.bins for p in parts}) != 1 or len(np.unique(stats.pixels)) != 1:
        raise TfpneumoError(f"{run_root}: the folds' OOF statistics mix image sizes or bins "
                            f"(pixels {sorted(set(stats.pixels.tolist()))}); evaluate folds "
                            "trained on the same cache")
    pixels, bins = int(stats.pixels[0]), stats.bins
    grids = Grids(bins=bins, tops=snap(tops_f, bins), min_areas=_area_grid(min_areas,
                  "--min-areas", pixels), bottoms=snap(bottoms_f, bins),
                  label_thresholds=labels_f)

    pooled = search(stats, grids)
    best = max((pooled.best_triplet(), pooled.best_label(), pooled.best_plain()),
               key=lambda r: round(r["score"], 12))  # first wins ties: the triplet
    best["min_area_fraction"] = None if best["min_area"] is None else best["min_area"] / pixels
    best["pixels"] = pixels
    pred_area, image_dice = apply_rule(stats, best)

    per_fold = {}
    for k in fold_ids:
        index = stats.fold == k
        result = search(stats.subset(index), grids)
        per_fold[k] = _summary(result) | {"model": models[k],
                                          "best_rule_score": float(image_dice[index].mean())}
    summary = {
        "experiment": cfg.experiment,
        "folds_used": fold_ids,
        "n_images": len(stats),
        "pixels": pixels,
        "image_side": _side(pixels),
        "pixel_rule": f"pixel on when floor({bins} * prob) >= bin, i.e. prob >= bin / {bins}",
        "grids": grids.to_json(),
        "empty_score": pooled.empty_score,
        "best": best,
        "pooled": _summary(pooled) | {"best_rule_score": float(image_dice.mean()),
                                      "scores": _score_grids(pooled)},
        "folds": {str(k): v for k, v in per_fold.items()},
    }

    out_dir = Path(out) if out is not None else run_root
    out_dir.mkdir(parents=True, exist_ok=True)
    truth_area = stats.hist_true.sum(axis=1, dtype=np.int64)
    _atomic_write(out_dir / EVALUATION_JSON, json.dumps(summary, indent=1).encode())
    _atomic_write(out_dir / IMAGES_CSV, _images_csv(stats, truth_area, pred_area, image_dice))
    _atomic_write(out_dir / HEATMAP_PNG, render_heatmap(pooled, pixels))

    notes = []
    if len(np.unique(stats.image_id)) != len(stats):
        notes.append("note: some image ids occur in several folds; the pooled score counts "
                     "them twice (were the folds trained on different caches?)")
    lost = int(np.sum((stats.has_mask > 0) != (truth_area > 0)))
    if lost:
        notes.append(f"note: {lost} images have has_mask disagreeing with their cached mask "
                     "(a tiny mask lost at the cached size?); scores use the cached masks")
    notes.extend(_border_notes(best, pooled))
    if pooled.empty_score > best["score"]:
        notes.append("warning: predicting every image empty scores higher than every rule "
                     "searched; the model or the grids need work")
    return "\n".join([
        _table(cfg.experiment, fold_ids, per_fold, summary, pixels, models),
        *notes,
        f"best rule (pooled): {_describe(best, pixels)}",
        f"wrote {out_dir / EVALUATION_JSON}, {IMAGES_CSV}, {HEATMAP_PNG}",
    ])


def _border_notes(best: dict, result: SearchResult) -> list[str]:
    """Hints when the chosen rule sits on the edge of a grid and nothing inside it ties."""
    g, notes = result.grids, []

    def check(inside: np.ndarray, noun: str, option: str, side: str) -> None:
        finite = inside[np.isfinite(inside)]
        if finite.size and round(float(finite.max()), 12) < round(best["score"], 12):
            notes.append(f"note: the best {noun} is the {side} searched; consider widening "
                         f"{option}")

    if best["rule"] == "triplet":
        if len(g.tops) > 1 and best["top_bin"] == g.tops.max():
            check(result.triplet[:-1], "top", "--thresholds", "largest")
        if len(g.min_areas) > 1 and 0 < best["min_area"] == g.min_areas.max():
            check(result.triplet[:, :-1], "min area", "--min-areas", "largest")
        if (len(g.bottoms) > 1 and best["bottom_bin"] == g.bottoms.min()
                and best["bottom_bin"] != best["top_bin"]):
            check(result.triplet[:, :, g.edges != g.bottoms.min()], "bottom", "--bottoms",
                  "smallest")
    else:
        lts = g.label_thresholds
        if len(lts) > 1 and best["label_threshold"] == round(float(lts.max()), 10):
            check(result.label[:-1], "label threshold", "--label-thresholds", "largest")
        if len(lts) > 1 and best["label_threshold"] == round(float(lts.min()), 10):
            check(result.label[1:], "label threshold", "--label-thresholds", "smallest")
        if len(g.edges) > 1 and best["bottom_bin"] == g.edges.min():
            check(result.label[:, 1:], "mask threshold", "--bottoms", "smallest")
    return notes


def _oof_model(path: Path) -> str:
    with np.load(path, allow_pickle=False) as data:
        return str(data["model"]) if "model" in data.files else "?"


def _side(pixels: int) -> int | None:
    side = math.isqrt(pixels)
    return side if side * side == pixels else None


def _summary(result: SearchResult) -> dict:
    return {
        "n_images": result.n_images,
        "empty_score": result.empty_score,
        "triplet": result.best_triplet(),
        "label": result.best_label(),
        "plain": result.best_plain(),
    }


def _score_grids(result: SearchResult) -> dict:
    """Every searched score, rounded, NaN as null (JSON has no NaN)."""

    def clean(a: np.ndarray) -> list:
        return np.where(np.isnan(a), None, np.round(a, 6)).tolist()

    g = result.grids
    return {
        "edges": [k / g.bins for k in g.edges.tolist()],
        "triplet": clean(result.triplet),  # [top][min_area][edge]
        "label": clean(result.label),  # [label_threshold][edge]
        "plain": clean(result.plain),  # [edge]
    }


def _images_csv(stats: OofStats, truth_area: np.ndarray, pred_area: np.ndarray,
                image_dice: np.ndarray) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image_id", "fold", "has_mask", "label_prob", "truth_area", "pred_area",
                     "dice"])
    for row in zip(stats.image_id.tolist(), stats.fold.tolist(), stats.has_mask.tolist(),
                   stats.label_prob.tolist(), truth_area.tolist(), pred_area.tolist(),
                   image_dice.tolist(), strict=True):
        writer.writerow([row[0], row[1], row[2], f"{row[3]:.6f}", row[4], row[5],
                         f"{row[6]:.6f}"])
    return buffer.getvalue().encode()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _describe(rule: dict, pixels: int) -> str:
    if rule["rule"] == "triplet":
        share = 100 * rule["min_area"] / pixels
        text = (f"triplet top={rule['top']:.4f} min_area={rule['min_area']} px "
                f"({share:.3g}% of the image) bottom={rule['bottom']:.4f}")
    else:
        text = f"label t={rule['label_threshold']:g} bottom={rule['bottom']:.4f}"
    return f"{text} -> {rule['score']:.4f}"


def _table(experiment: str, fold_ids: list[int], per_fold: dict, summary: dict, pixels: int,
           models: dict) -> str:
    side = summary["image_side"]
    size = f"{side}x{side}" if side else f"{pixels} px"
    header = ["fold", "images", "all-empty", "top", "min_area", "bottom", "triplet",
              "label_t", "label_bottom", "label", "plain_t", "plain", "best_rule"]
    rows = []
    for name, s in [*((str(k), per_fold[k]) for k in fold_ids), ("all", summary["pooled"])]:
        tr, lb, pl = s["triplet"], s["label"], s["plain"]
        rows.append([name, str(s["n_images"]), f"{s['empty_score']:.4f}", f"{tr['top']:.4f}",
                     str(tr["min_area"]), f"{tr['bottom']:.4f}", f"{tr['score']:.4f}",
                     f"{lb['label_threshold']:g}", f"{lb['bottom']:.4f}", f"{lb['score']:.4f}",
                     f"{pl['top']:.4f}", f"{pl['score']:.4f}", f"{s['best_rule_score']:.4f}"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    kinds = ",".join(sorted(set(models.values())))
    title = (f"OOF rule search: experiment {experiment}, folds {','.join(map(str, fold_ids))}, "
             f"{summary['n_images']} images at {size}, model {kinds}")
    legend = ["triplet: positive if count(prob >= top) >= min_area, mask prob >= bottom; "
              "label: positive if label_prob > t,",
              "mask prob >= label_bottom; plain: mask prob >= t; all-empty: every image "
              "predicted empty; best_rule: the pooled best rule on the fold"]
    return "\n".join([title, line(header), *(line(r) for r in rows), *legend])


# ----------------------------------------------------------------------------- heatmap

_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98),
                     (253, 231, 37)], np.float64)


def _colour(value: float) -> tuple[int, int, int]:
    """A viridis-like colour for ``value`` in [0, 1]."""
    x = min(max(value, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(x), len(_VIRIDIS) - 2)
    rgb = _VIRIDIS[i] + (x - i) * (_VIRIDIS[i + 1] - _VIRIDIS[i])
    return tuple(int(round(c)) for c in rgb)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


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

    font, small = _font(14), _font(12)
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
    draw.text((10, 10), f"pooled OOF score, triplet rule, {slice_name}", fill="black", font=font)
    draw.text((10, 30), f"best (red): {_describe(trip, pixels)}; all-empty "
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
    side = _side(pixels)
    return f"{side}x{side}" if side else f"{pixels}-pixel"
