"""The ``pipeline`` section: ``train_dataset`` with the default augmentations, per setting."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tfpneumo.bench.harness import (
    Context,
    Row,
    cores,
    device_name,
    error_line,
    progress,
    rate,
    span,
    spread,
)
from tfpneumo.bench.synthetic import prepared_cache, synthetic_dicoms

AUTOTUNE = -1
PIPELINE_TARGET_PER_CORE = 60.0  # img/s per core at 512 (issue: the pipeline must not starve)


def time_pipeline(cache: Path, image_size: int, npc: int, threads: int, batch: int,
                  batches: int, repeats: int = 3, vectorize: bool = True,
                  in_memory: str = "always") -> dict:
    """images/s and images per process CPU-second (all threads) of ``train_dataset``.

    One warm-up run of ``batches`` batches (fills the in-memory cache, lets the autotuner
    settle), then ``repeats`` timed runs. ``threads`` is tf.data's private thread pool.
    """
    from tfpneumo.config import load_config, replace
    from tfpneumo.data import pipeline
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    cfg = replace(load_config(None), data={"image_size": image_size, "batch_size": batch,
                                           "num_parallel_calls": npc, "cache_in_memory": in_memory,
                                           "shuffle_buffer": 64})
    ds, _ = pipeline.train_dataset(cache, -1, cfg, epochs=10, seed=0, vectorize=vectorize)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    it = iter(ds.with_options(options))
    for _ in range(batches):
        next(it)
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(it)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    n = batches * batch
    rates = [n / w for w in walls]
    return {"img_per_s": spread(rates), "img_per_cpu_s": rate(n, statistics.median(cpus)),
            "images_per_run": n}


def bench_pipeline(ctx: Context, *, sizes: Sequence[int] = (256, 512, 1024),
                   settings: Sequence[Sequence[int]] | None = None, images: int | None = None,
                   batch: int = 8, batches: int | None = None, repeats: int = 3,
                   vectorize: bool = True, in_memory: str = "always") -> dict:
    """``train_dataset`` (default augmentations, positive-rate schedule, in-memory cache) per
    ``(num_parallel_calls, threads)`` setting (default: (1, 1), (2, 2), (AUTOTUNE, cores);
    quick: (1, 1), (AUTOTUNE, cores)), on a cache of each output side prepared from the same
    ``images`` synthetic DICOMs (drawn at the largest side, as real ones are larger)."""
    from tfpneumo.tfimport import quiet_tensorflow

    quiet_tensorflow()
    n_cores = cores()
    if settings is None:
        base = [(1, 1)] if ctx.quick else [(1, 1), (2, 2)]
        settings = list(dict.fromkeys([*base, (AUTOTUNE, n_cores)]))
    images = images or (64 if ctx.quick else 200)
    batches = batches or (5 if ctx.quick else 25)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tfpneumo-bench-pipeline-") as tmp:
        dicoms = synthetic_dicoms(Path(tmp) / "dicoms", images, max(sizes))
        for size in sizes:
            cache = prepared_cache(dicoms, Path(tmp) / f"cache{size}", size)
            for npc, threads in settings:
                row: dict[str, Any] = {"size": size, "npc": npc, "threads": threads, "batch": batch,
                                       "batches": batches, "repeats": repeats}
                try:
                    row.update(time_pipeline(cache, size, npc, threads, batch, batches, repeats,
                                             vectorize, in_memory))
                    progress(f"pipeline {size} px npc={npc_name(npc)}: "
                             f"{row['img_per_s']['median']:.1f} img/s")
                except Exception as e:  # one setting failing is a result, not a crash
                    row["error"] = error_line(e)
                rows.append(row)
            shutil.rmtree(cache, ignore_errors=True)
    return {"images": images, "vectorize": vectorize, "in_memory": in_memory,
            "target_per_core_512": PIPELINE_TARGET_PER_CORE, "device": device_name(),
            "rows": rows}


def npc_name(npc: int) -> str:
    return "AUTOTUNE" if npc == AUTOTUNE else str(npc)


def rows_pipeline(result: dict) -> list[Row]:
    out = []
    for r in result["rows"]:
        setting = (f"{r['size']} px, batch {r['batch']}, npc {npc_name(r['npc'])}, "
                   f"{r['threads']} thread(s)")
        if "error" in r:
            out.append(Row(setting, "failed", r["error"]))
            continue
        s, per_cpu = r["img_per_s"], r["img_per_cpu_s"]
        note = f"{per_cpu:.1f} img/CPU-s" if per_cpu else ""
        if r["size"] == 512 and per_cpu:
            met = "met" if per_cpu >= PIPELINE_TARGET_PER_CORE else "NOT met"
            note += f"; target >= {PIPELINE_TARGET_PER_CORE:.0f} img/s per core: {met}"
        out.append(Row(setting, f"{s['median']:.1f} img/s{span(s, '.0f')}", note))
    return out
