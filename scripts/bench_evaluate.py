"""Speed and memory of the out-of-fold rule search (``tfpneumo evaluate``).

Builds 12,000 images' worth of random OOF statistics (histograms of 512x512 probability maps,
22 % positives, some false-positive blobs), splits them into 5 fake fold folders in a
temporary directory, and times

* ``search`` on all images pooled (the core: every triplet, label rule and plain threshold),
* ``evaluate`` end to end (read 5 oof.npz, pooled + per-fold searches, JSON, CSV, heatmap).

Prints the median of the repeats, the number of triplets searched and the peak RSS
(``resource.getrusage``). Target: the full search under 5 s for 12,000 images x 1,000 triplets.

    python scripts/bench_evaluate.py
    python scripts/bench_evaluate.py --images 12000 --thresholds 0.3:0.8:0.025 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tfpneumo.config import Config
from tfpneumo.evaluate import Grids, OofStats, _area_grid, evaluate, parse_grid, search, snap

BINS = 256


def binned_beta(a: float, b: float) -> np.ndarray:
    """A Beta(a, b) density discretised on the 256 bins, (256,) float64 summing to 1."""
    x = (np.arange(BINS) + 0.5) / BINS
    p = x ** (a - 1) * (1 - x) ** (b - 1)
    return p / p.sum()


def random_stats(n: int, side: int, seed: int = 0) -> OofStats:
    """Plausible OOF statistics without any probability map: multinomial histograms."""
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
                    fold=np.arange(n) % 5, label_prob=label_prob.astype(np.float32),
                    has_mask=positive.astype(np.int8), hist_all=hist_all.astype(np.int32),
                    hist_true=hist_true.astype(np.int32),
                    pixels=np.full(n, pixels, np.int64))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12_000)
    parser.add_argument("--side", type=int, default=512, help="cached image side")
    parser.add_argument("--thresholds", default="0.3:0.8:0.025")
    parser.add_argument("--min-areas", default="auto")
    parser.add_argument("--bottoms", default="0.2:0.5:0.05")
    parser.add_argument("--label-thresholds", default="0.3:0.8:0.05")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    stats = random_stats(args.images, args.side)
    rss_data = peak_rss_mb()
    grids = Grids(bins=BINS, tops=snap(parse_grid(args.thresholds, "--thresholds"), BINS),
                  min_areas=_area_grid(args.min_areas, "--min-areas", args.side ** 2),
                  bottoms=snap(parse_grid(args.bottoms, "--bottoms"), BINS),
                  label_thresholds=parse_grid(args.label_thresholds, "--label-thresholds"))
    result = search(stats, grids)
    n_triplets = int(np.isfinite(result.triplet).sum())
    core, core_runs = timed(lambda: search(stats, grids), args.repeats)
    rss_search = peak_rss_mb()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs" / "bench"
        for k in range(5):
            part = stats.subset(stats.fold == k)
            folder = root / f"fold_{k}"
            folder.mkdir(parents=True)
            np.savez(folder / "oof.npz", image_id=part.image_id, label_prob=part.label_prob,
                     has_mask=part.has_mask, hist_all=part.hist_all, hist_true=part.hist_true,
                     pixels=part.pixels, fold=k, model="best")
            (folder / "result.json").write_text(json.dumps({"fold": k}))

        def run() -> str:
            return evaluate(Config(experiment="bench"), thresholds=args.thresholds,
                            min_areas=args.min_areas, bottoms=args.bottoms,
                            label_thresholds=args.label_thresholds, workdir=Path(tmp))

        table = run()
        full, full_runs = timed(run, args.repeats)
        rss_full = peak_rss_mb()

    print(table)
    print(f"\n{args.images} images at {args.side}x{args.side}; grids: {len(grids.tops)} tops x "
          f"{len(grids.min_areas)} min areas x {len(grids.edges)} pixel thresholds -> "
          f"{n_triplets} triplets, {result.label.size} label rules, {result.plain.size} plain")
    print(f"search (pooled):        {core:.3f} s, median of {args.repeats} "
          f"({', '.join(f'{t:.3f}' for t in core_runs)})")
    print(f"evaluate (end to end):  {full:.3f} s, median of {args.repeats} "
          f"({', '.join(f'{t:.3f}' for t in full_runs)}) incl. 5 per-fold searches and files")
    print(f"peak RSS: {rss_data:.0f} MB after building the statistics, {rss_search:.0f} MB "
          f"after the search, {rss_full:.0f} MB after evaluate")


if __name__ == "__main__":
    main()
