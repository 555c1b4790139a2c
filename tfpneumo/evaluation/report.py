"""``tfpneumo evaluate``: the out-of-fold rule search of a run, its table and its files.

Reads the OOF statistics of the trained folds (:mod:`tfpneumo.evaluation.oof`), searches the
rules (:mod:`tfpneumo.evaluation.search`) pooled and per fold, for each way of merging the
TTA members the statistics hold (the best merge and rule win together), and writes into
``runs/<experiment>/`` (or ``out``): ``evaluation.json`` (everything, plus the chosen
``best`` rule that ``submit``, ``predict`` and the export apply), ``evaluation_images.csv``
(one row per OOF image under the best rule) and ``evaluation_heatmap.png``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from tfpneumo import runs
from tfpneumo.config import Config
from tfpneumo.errors import TfpneumoError
from tfpneumo.evaluation.heatmap import render_heatmap
from tfpneumo.evaluation.oof import OofStats, load_run_oof_merges
from tfpneumo.evaluation.rules import MERGES, Rule
from tfpneumo.evaluation.search import (
    Grids,
    SearchResult,
    area_grid,
    describe_best,
    image_side,
    search,
    snap,
)
from tfpneumo.files import write_bytes, write_json

DEFAULT_TOPS = tuple(np.round(np.arange(0.3, 0.8001, 0.05), 10))  # --thresholds 0.3:0.8
DEFAULT_BOTTOMS = (0.2, 0.3, 0.4, 0.5)  # --bottoms 0.2:0.5:0.1
DEFAULT_LABEL_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # --label-thresholds 0.3:0.8:0.1


@dataclass(frozen=True)
class EvaluationResult:
    """What ``evaluate`` found: the summary written to evaluation.json and the printed text."""

    summary: dict
    text: str

    @property
    def best(self) -> Rule:
        return Rule.from_json(self.summary["best"])

    def __str__(self) -> str:
        return self.text


def evaluate(cfg: Config, *, folds: runs.FoldSpec = "all",
             thresholds: Sequence[float] = DEFAULT_TOPS,
             min_areas: Literal["auto"] | Sequence[int] = "auto",
             bottoms: Sequence[float] = DEFAULT_BOTTOMS,
             label_thresholds: Sequence[float] = DEFAULT_LABEL_THRESHOLDS,
             workdir: Path = Path("."), out: Path | None = None,
             weights: str = "auto", merges: Sequence[str] = MERGES) -> EvaluationResult:
    """Searches the triplet, label and plain rules on the OOF statistics of ``folds``.

    ``thresholds`` are the triplet tops, ``bottoms`` the triplet mask thresholds (``bottom =
    top`` is always tried too); the label rule's mask threshold and the plain threshold range
    over both lists. ``min_areas`` are pixels at the cached resolution or ``auto``
    (fractions :data:`~tfpneumo.evaluation.search.MIN_AREA_FRACTIONS` of the image);
    ``label_thresholds`` act on the classification head. Writes evaluation.json, the
    per-image CSV and the heatmap into ``out`` (default ``runs/<experiment>/``).

    ``weights``: whose out-of-fold statistics (``auto``: the network submit uses by default,
    the averaged one when training made one; a kind: that network's own, written as
    ``evaluation_<kind>.json``, ..., which ``submit --weights <kind>`` reads).

    ``merges``: the ways of merging the TTA members to compare (those the statistics hold;
    see :mod:`tfpneumo.inference.ensemble`); the best rule names its merge, ``mean`` on ties.
    """
    json_name, images_name, heatmap_name = runs.evaluation_names(weights)
    run_root = runs.run_root(cfg.experiment, workdir)
    fold_ids = runs.resolve_trained_folds(cfg.experiment, folds, workdir)
    by_merge, models = load_run_oof_merges(cfg.experiment, fold_ids, workdir, weights)
    compared = [m for m in by_merge if m in merges]
    if not compared:
        raise TfpneumoError(f"--merges {','.join(merges)}: the out-of-fold statistics hold "
                            f"only {', '.join(by_merge)}")
    stats = by_merge[compared[0]]
    pixels, bins = int(stats.pixels[0]), stats.bins
    grids = Grids(bins=bins, tops=snap(np.asarray(thresholds, np.float64), bins),
                  min_areas=area_grid(min_areas, pixels),
                  bottoms=snap(np.asarray(bottoms, np.float64), bins),
                  label_thresholds=np.unique(np.asarray(label_thresholds, np.float64)))

    searched = {m: search(by_merge[m], grids) for m in compared}
    # first wins ties: mean before the other merges, the triplet before label and plain
    best = max(({**rule, "merge": m} for m, result in searched.items()
                for rule in (result.best_triplet(), result.best_label(), result.best_plain())),
               key=lambda r: round(r["score"], 12))
    stats, pooled = by_merge[best["merge"]], searched[best["merge"]]
    best["min_area_fraction"] = None if best["min_area"] is None else best["min_area"] / pixels
    best["pixels"] = pixels
    pred_area, image_dice = Rule.from_json(best).score_oof(stats)

    per_fold = {}
    for k in fold_ids:
        index = stats.fold == k
        result = search(stats.subset(index), grids)
        per_fold[k] = _summary(result) | {"model": models[k],
                                          "best_rule_score": float(image_dice[index].mean())}
    summary = {
        "experiment": cfg.experiment,
        "weights": weights,
        "folds_used": fold_ids,
        "n_images": len(stats),
        "pixels": pixels,
        "image_side": image_side(pixels),
        "pixel_rule": f"pixel on when floor({bins} * prob) >= bin, i.e. prob >= bin / {bins}",
        "grids": grids.to_json(),
        "empty_score": pooled.empty_score,
        "best": best,
        "merges": {m: _summary(result) for m, result in searched.items()},
        "pooled": _summary(pooled) | {"best_rule_score": float(image_dice.mean()),
                                      "scores": _score_grids(pooled)},
        "folds": {str(k): v for k, v in per_fold.items()},
    }

    out_dir = Path(out) if out is not None else run_root
    out_dir.mkdir(parents=True, exist_ok=True)
    truth_area = stats.hist_true.sum(axis=1, dtype=np.int64)
    write_json(out_dir / json_name, summary)
    write_bytes(out_dir / images_name, _images_csv(stats, truth_area, pred_area, image_dice))
    write_bytes(out_dir / heatmap_name, render_heatmap(pooled, pixels))

    notes = []
    if len(np.unique(stats.image_id)) != len(stats):
        notes.append("note: some image ids occur in several folds; the pooled score counts "
                     "them twice (were the folds trained on different caches?)")
    lost = int(np.sum((stats.has_mask > 0) != (truth_area > 0)))
    if lost:
        notes.append(f"note: {lost} images have has_mask disagreeing with their cached mask "
                     "(a tiny mask lost at the cached size?); scores use the cached masks")
    notes.extend(_border_notes(best, pooled))
    if len(compared) < len(MERGES) and set(merges) == set(MERGES):
        notes.append(f"note: merges compared: {', '.join(compared)} (statistics written "
                     "without flip TTA, or before merges were recorded, hold the mean only)")
    if pooled.empty_score > best["score"]:
        notes.append("warning: predicting every image empty scores higher than every rule "
                     "searched; the model or the grids need work")
    return EvaluationResult(summary, "\n".join([
        _table(cfg.experiment, fold_ids, per_fold, summary, pixels, models),
        *_merge_table(searched, best["merge"]),
        *notes,
        f"best rule (pooled): {describe_best(best, pixels)}",
        f"wrote {out_dir / json_name}, {images_name}, {heatmap_name}",
    ]))


def _merge_table(searched: dict[str, SearchResult], chosen: str) -> list[str]:
    """Lines comparing the merges (pooled best of each rule kind), or none for one merge."""
    if len(searched) < 2:
        return []
    lines = ["merges of the TTA members (pooled; the table above is the chosen one's):"]
    for merge, result in searched.items():
        best = max(result.best_triplet()["score"], result.best_label()["score"],
                   result.best_plain()["score"])
        lines.append(f"  {merge:<11}  triplet {result.best_triplet()['score']:.4f}  label "
                     f"{result.best_label()['score']:.4f}  plain {result.best_plain()['score']:.4f}"
                     f"  best {best:.4f}{'  <- chosen' if merge == chosen else ''}")
    return lines


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


