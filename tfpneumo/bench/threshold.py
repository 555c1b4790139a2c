"""The ``threshold`` section: the rule search of ``tfpneumo evaluate`` on generated OOF
statistics, alone and end to end over fake fold folders."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tfpneumo.bench.harness import Context, Row, progress, span, spread
from tfpneumo.evaluation.oof import HIST_BINS, OofStats

THRESHOLD_TARGET_S = 5.0  # full rule search, 12,000 images x 1,000 triplets
EXPERIMENT = "bench"


def binned_beta(a: float, b: float) -> np.ndarray:
    """A Beta(a, b) density discretised on the 256 bins, (256,) float64 summing to 1."""
    x = (np.arange(HIST_BINS) + 0.5) / HIST_BINS
    p = x ** (a - 1) * (1 - x) ** (b - 1)
    return p / p.sum()


def random_oof_stats(n: int, side: int, seed: int = 0, folds: int = 5) -> OofStats:
    """Plausible :class:`~tfpneumo.evaluation.oof.OofStats` of ``n`` images of ``side`` pixels
    in ``folds`` folds, without any probability map: multinomial histograms, 22 % positives,
    some false blobs."""
    rng = np.random.default_rng(seed)
    pixels = side * side
    positive = rng.random(n) < 0.22
    truth = np.where(positive, np.clip(rng.lognormal(np.log(0.005 * pixels), 1.0, n), 20,
                                       0.2 * pixels), 0).astype(np.int64)
    false_blob = np.where(rng.random(n) < 0.3, rng.lognormal(np.log(0.001 * pixels), 1.0, n),
                          0).astype(np.int64)
    background = pixels - truth - false_blob
    quality = rng.beta(4, 1.5, n)[:, None]  # how well the network finds each pneumothorax
    p_true = quality * binned_beta(6, 2) + (1 - quality) * binned_beta(1.2, 8)
    hist_true = rng.multinomial(truth, p_true)
    hist_all = (rng.multinomial(background, binned_beta(1.0, 40)) + hist_true
                + rng.multinomial(false_blob, binned_beta(3, 3)))
    label_prob = np.where(positive, rng.beta(5, 2, n), rng.beta(1.5, 6, n))
    return OofStats(image_id=np.array([f"img{i:05d}" for i in range(n)]),
                    fold=np.arange(n) % folds, label_prob=label_prob.astype(np.float32),
                    has_mask=positive.astype(np.int8), hist_all=hist_all.astype(np.int32),
                    hist_true=hist_true.astype(np.int32), pixels=np.full(n, pixels, np.int64))


def write_fake_run(stats: OofStats, workdir: Path, experiment: str = EXPERIMENT) -> list[int]:
    """``runs/<experiment>/fold_<k>/`` of every fold in ``stats`` as training leaves it for
    ``evaluate``: ``oof.npz`` (the arrays :func:`~tfpneumo.evaluation.oof.load_oof` reads,
    plus ``fold`` and ``model``) and ``result.json`` (the fold is trained). Returns the folds."""
    from tfpneumo import runs
    from tfpneumo.files import write_json, write_npz

    folds = sorted(int(k) for k in np.unique(stats.fold))
    for k in folds:
        part = stats.subset(stats.fold == k)
        folder = runs.fold_dir(experiment, k, workdir)
        folder.mkdir(parents=True)
        write_npz(folder / runs.OOF, image_id=part.image_id, label_prob=part.label_prob,
                  has_mask=part.has_mask, hist_all=part.hist_all, hist_true=part.hist_true,
                  pixels=part.pixels, fold=k, model="best")
        write_json(folder / runs.RESULT, {"fold": k})
    return folds


def _timed(fn: Callable[[], Any], repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return spread(times)


def bench_threshold(ctx: Context, *, images: int = 12_000, side: int = 512,
                    thresholds: str = "0.3:0.8:0.025", min_areas: str = "auto",
                    bottoms: str = "0.2:0.5:0.05", label_thresholds: str = "0.3:0.8:0.05",
                    repeats: int | None = None, end_to_end: bool = True) -> dict:
    """``search`` on ``images`` random OOF statistics pooled, and ``evaluate`` end to end over
    5 fake fold folders (read oof.npz, pooled and per-fold searches, JSON, CSV, heatmap);
    medians of ``repeats`` after one untimed call.

    The grids are ``tfpneumo evaluate``'s option strings, parsed once here by
    :mod:`tfpneumo.grammar` as the command line parses them; both timings use those values.
    """
    from tfpneumo import grammar
    from tfpneumo.evaluation.search import Grids, area_grid, search, snap

    grid_values = {
        "thresholds": grammar.probability_grid(thresholds, "--thresholds"),
        "min_areas": grammar.area_grid(min_areas, "--min-areas"),
        "bottoms": grammar.probability_grid(bottoms, "--bottoms"),
        "label_thresholds": grammar.probability_grid(label_thresholds, "--label-thresholds")}
    repeats = repeats or (3 if ctx.quick else 5)
    stats = random_oof_stats(images, side)
    grids = Grids(bins=stats.bins, tops=snap(grid_values["thresholds"], stats.bins),
                  min_areas=area_grid(grid_values["min_areas"], side ** 2),
                  bottoms=snap(grid_values["bottoms"], stats.bins),
                  label_thresholds=grid_values["label_thresholds"])
    result = search(stats, grids)
    out: dict[str, Any] = {"images": images, "side": side,
                           "triplets": int(np.isfinite(result.triplet).sum()),
                           "label_rules": int(result.label.size), "plain_rules": int(result.plain.size),
                           "search_s": _timed(lambda: search(stats, grids), repeats)}
    progress(f"threshold search: {out['search_s']['median']:.3f} s")
    if end_to_end:
        from tfpneumo.config import Config
        from tfpneumo.evaluation.report import evaluate

        with tempfile.TemporaryDirectory(prefix="tfpneumo-bench-evaluate-") as tmp:
            folds = write_fake_run(stats, Path(tmp))

            def run() -> None:
                evaluate(Config(experiment=EXPERIMENT), folds=folds, workdir=Path(tmp),
                         **grid_values)

            run()
            out["evaluate_s"] = _timed(run, repeats)
            out["folds"] = len(folds)
        progress(f"evaluate end to end: {out['evaluate_s']['median']:.3f} s")
    return out


def rows_threshold(result: dict) -> list[Row]:
    s = result["search_s"]
    met = "met" if s["median"] < THRESHOLD_TARGET_S else "NOT met"
    rows = [Row(f"search, {result['images']:,} images x {result['triplets']:,} triplets",
                f"{s['median']:.3f} s{span(s, '.3f')}",
                f"+{result['label_rules']} label, {result['plain_rules']} plain rules; "
                f"target < {THRESHOLD_TARGET_S:.0f} s: {met}")]
    if "evaluate_s" in result:
        e = result["evaluate_s"]
        rows.append(Row(f"evaluate end to end, {result.get('folds', 5)} folds",
                        f"{e['median']:.2f} s{span(e, '.2f')}",
                        "pooled + per-fold searches, JSON, CSV, heatmap"))
    return rows
