"""The ``service`` section: the heavy (albumentations) transforms in the training process and
through a local tf.data service of worker processes."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tfpneumo.bench.harness import Context, Row, error_line, process_cpu_s, progress, span, spread
from tfpneumo.bench.synthetic import synthetic_cache

# The albumentations transforms, each at a typical training probability.
HEAVY_AUGMENT = {"elastic_p": 0.5, "grid_distortion_p": 0.3, "optical_distortion_p": 0.3,
                 "clahe_p": 0.3}
SERVICE_TARGET_SCALING = 1.8  # 1 -> 2 worker processes


def bench_service(ctx: Context, *, size: int = 512, workers: Sequence[int] = (0, 1, 2),
                  images: int | None = None, batch: int = 8, warmup: int | None = None,
                  batches: int | None = None, repeats: int = 3) -> dict:
    """The training pipeline with the heavy (albumentations) transforms on, in this process
    (0) and through a local tf.data service of 1 and 2 worker processes (one core each).

    images/s read by this process after ``warmup`` batches (the workers' buffers fill): the
    median of ``repeats`` windows of ``batches`` batches; the CPU milliseconds per image of the
    workers and of this (reading) process, which shares the cores with them here. A cache of
    small shards (prepared from synthetic DICOMs): the service hands out record files, so each
    worker needs several.
    """
    from tfpneumo.config import load_config, replace
    from tfpneumo.data import pipeline
    from tfpneumo.data.service import start_local_service, stop_local_service
    from tfpneumo.tfimport import quiet_tensorflow

    quiet_tensorflow()
    images = images or (96 if ctx.quick else 256)
    warmup = warmup or (8 if ctx.quick else 20)
    batches = batches or (12 if ctx.quick else 40)
    cfg = replace(load_config(None), data={"image_size": size, "batch_size": batch,
                                           "shuffle_buffer": 64}, augment=HEAVY_AUGMENT)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tfpneumo-bench-service-") as tmp:
        cache = synthetic_cache(Path(tmp), size, images, shard_size=8)
        for n in workers:
            handles, address = None, None
            try:
                if n:
                    address, handles = start_local_service(n, augments=[cfg.augment])
                # as train reads it: uint8 crops, the float32 lookup happens in the train step
                ds, _ = pipeline.train_dataset(cache, -1, cfg, epochs=10, seed=0, service=address,
                                               device_finish=True)
                it = iter(ds)
                for _ in range(warmup):
                    next(it)
                pids = handles.worker_pids if handles else []
                w0 = sum(process_cpu_s(pid) for pid in pids)
                c0 = time.process_time()
                walls = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for _ in range(batches):
                        next(it)
                    walls.append(time.perf_counter() - t0)
                del it, ds
                n_img = batches * batch * repeats
                row = {"workers": n, "img_per_s": spread([batches * batch / w for w in walls]),
                       "reader_cpu_ms_per_img": 1e3 * (time.process_time() - c0) / n_img,
                       "worker_cpu_ms_per_img": (1e3 * (sum(process_cpu_s(p) for p in pids) - w0)
                                                 / n_img if pids else None)}
                progress(f"service, {n} worker(s): {row['img_per_s']['median']:.1f} img/s")
            except Exception as e:  # one setting failing is a result, not a crash
                row = {"workers": n, "error": error_line(e)}
            finally:
                if handles:
                    stop_local_service(handles)
            rows.append(row)
    by_n = {r["workers"]: r["img_per_s"]["median"] for r in rows if "error" not in r}
    scaling = by_n[2] / by_n[1] if 1 in by_n and 2 in by_n else None
    return {"size": size, "batch": batch, "augment": HEAVY_AUGMENT,
            "images_timed": batches * batch * repeats,
            "rows": rows, "scaling_1_to_2": scaling, "target_scaling": SERVICE_TARGET_SCALING}


def rows_service(result: dict) -> list[Row]:
    out = []
    for r in result["rows"]:
        where = (f"{r['workers']} worker process(es)" if r["workers"] else "in this process")
        setting = f"{result['size']} px + albumentations, {where}"
        if "error" in r:
            out.append(Row(setting, "failed", r["error"]))
            continue
        note = f"reader {r['reader_cpu_ms_per_img']:.1f} CPU-ms/img"
        if r["worker_cpu_ms_per_img"] is not None:
            note += f", workers {r['worker_cpu_ms_per_img']:.1f} CPU-ms/img"
        if r["workers"] == 2 and result["scaling_1_to_2"]:
            met = "met" if result["scaling_1_to_2"] >= result["target_scaling"] else "NOT met"
            note += (f"; {result['scaling_1_to_2']:.2f}x from 1 to 2 workers "
                     f"(target {result['target_scaling']}x: {met})")
        out.append(Row(setting, f"{r['img_per_s']['median']:.1f} img/s{span(r['img_per_s'], '.0f')}",
                       note))
    return out
