"""The ``prepare`` section: ``tfpneumo prepare`` of real DICOMs, one worker and all cores."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tfpneumo.bench.harness import Context, Row, cores, progress, rate, span, spread


def bench_prepare(ctx: Context, *, size: int = 512, workers: Sequence[int] | None = None,
                  repeats: int | None = None) -> dict:
    """``prepare_cache`` of the real siim-mini DICOMs (58: 48 train + 10 test) to a ``size``
    cache with 1 worker and with all cores, each into a fresh folder.

    images/s end to end (the all-cores run includes starting the spawn workers, each of
    which imports TensorFlow) and the steady rate per worker from the shards' own timings.
    """
    mini = ctx.siim_mini
    if mini is None or not (mini / "dicom-images-train").is_dir():
        return {"skipped": f"{mini}: no siim-mini folder with dicom-images-train/ "
                           "(pass --siim-mini or set TFPNEUMO_SIIM)"}
    from tfpneumo.config import load_config, replace
    from tfpneumo.data.manifest import MANIFEST
    from tfpneumo.data.prepare import prepare_cache
    from tfpneumo.tfimport import quiet_tensorflow

    quiet_tensorflow()  # the 1-worker run then times decoding and writing, not TF's start-up
    repeats = repeats or (1 if ctx.quick else 3)
    n_cores = cores()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tfpneumo-bench-prepare-") as tmp:
        for n_workers in workers or sorted({1, n_cores}):
            walls, steady, images = [], [], 0
            for k in range(repeats):
                out = Path(tmp) / f"w{n_workers}-{k}"
                cfg = replace(load_config(None), prepare={"size": size, "workers": n_workers})
                start = time.perf_counter()
                prepare_cache(mini, out, cfg, progress=False)
                walls.append(time.perf_counter() - start)
                counts = json.loads((out / MANIFEST).read_text())["counts"]
                images = counts["train"] + counts["test"]
                # each shard's own time in its worker: decoding and writing, no start-up
                steady.append(sum(json.loads(p.read_text())["seconds"]
                                  for p in out.glob("*.tfrecord.json")))
            w, busy = spread(walls), statistics.median(steady)
            rows.append({"workers": n_workers, "images": images, "wall_s": w,
                         "img_per_s": images / w["median"],
                         "img_per_s_per_core": images / w["median"] / min(n_workers, n_cores),
                         "steady_img_per_s_per_worker": rate(images, busy),
                         "steady_img_per_s": rate(images * n_workers, busy),
                         "startup_s": max(0.0, w["median"] - busy / n_workers)})
            progress(f"prepare, {n_workers} worker(s): {rows[-1]['img_per_s']:.1f} img/s")
    return {"source": str(mini), "size": size, "repeats": repeats, "rows": rows}


def rows_prepare(result: dict) -> list[Row]:
    out = []
    for r in result["rows"]:
        w = r["wall_s"]
        out.append(Row(
            f"{r['images']} DICOMs 1024 -> {result['size']} cache, {r['workers']} worker(s)",
            f"{r['img_per_s']:.1f} img/s ({r['img_per_s_per_core']:.1f}/core)",
            f"{w['median']:.1f} s{span(w, '.1f')}, of which start-up + planning ~"
            f"{r['startup_s']:.1f} s; steady {r['steady_img_per_s'] or 0:.0f} img/s "
            f"({r['steady_img_per_s_per_worker'] or 0:.0f} per worker, from shard timings)"))
    return out
