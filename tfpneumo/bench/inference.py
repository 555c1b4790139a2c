"""The ``inference`` section: test-time prediction as ``tfpneumo submit`` runs it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tfpneumo.bench.harness import INFERENCE_CASES, Context, Row, device_name, error_line, progress, rate, span, spread
from tfpneumo.bench.synthetic import base_model_config


def bench_inference(ctx: Context, *, cases: Sequence[Sequence] | None = None, seed: int = 0) -> dict:
    """Test-time prediction as ``tfpneumo submit`` runs it: ``ensemble_predictor([net])`` of
    the base config's network (random weights, float32) on grey-pixel batches, as submit feeds it.

    ``cases``: ``(size, batch, hflip, batches_per_window, windows)``. The first call (trace and
    first-shape set-up) is reported apart; DICOM decoding (~5 ms an image) is not included.
    """
    from tfpneumo.tfimport import quiet_tensorflow

    quiet_tensorflow()
    import keras

    from tfpneumo.config import Config
    from tfpneumo.inference.ensemble import ensemble_predictor
    from tfpneumo.models.unet import build_model

    if cases is None:
        cases = INFERENCE_CASES[ctx.quick]
    keras.utils.set_random_seed(seed)
    net = build_model(base_model_config(Config()))
    rng = np.random.default_rng(seed)
    rows = []
    for size, batch, hflip, per_window, windows in cases:
        row: dict[str, Any] = {"size": size, "batch": batch, "hflip": bool(hflip),
                               "batches_per_window": per_window, "windows": windows}
        try:
            images = rng.integers(0, 256, (batch, size, size, 1)).astype(np.float32)  # grey pixels
            predictor = ensemble_predictor([net], hflip=bool(hflip))

            def call(images=images, predictor=predictor) -> None:
                probs, labels = predictor(images)
                probs.numpy(), labels.numpy()  # wait for the result, as submit does

            t0 = time.perf_counter()
            call()
            row["first_call_s"] = time.perf_counter() - t0
            walls, cpus = [], []
            for _ in range(windows):
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(per_window):
                    call()
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            n = per_window * batch
            row.update(img_per_s=spread([n / w for w in walls]),
                       img_per_cpu_s=rate(n, statistics.median(cpus)), images=n * windows)
            progress(f"inference {size} px x{batch} hflip={hflip}: "
                     f"{row['img_per_s']['median']:.2f} img/s")
        except Exception as e:
            row["error"] = error_line(e)
        rows.append(row)
    return {"rows": rows, "device": device_name()}


def rows_inference(result: dict) -> list[Row]:
    out = []
    for r in result["rows"]:
        setting = f"{r['size']} px x{r['batch']}, {'hflip TTA' if r['hflip'] else 'no TTA'}"
        if "error" in r:
            out.append(Row(setting, "failed", r["error"]))
            continue
        s, per_cpu = r["img_per_s"], r["img_per_cpu_s"]
        note = (f"{per_cpu:.2f} img/CPU-s; " if per_cpu else "") + (
            f"first call {r['first_call_s']:.1f} s; {r['images']} images timed")
        out.append(Row(setting, f"{s['median']:.2f} img/s{span(s, '.2f')}", note))
    return out
