"""The ``inference`` section: test-time prediction as ``tfpneumo submit`` runs it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tfpneumo.bench.harness import INFERENCE_CASES, Context, Row, device_name, error_line, progress, rate, span, spread
from tfpneumo.bench.synthetic import base_model_config


def bench_inference(ctx: Context, *, cases: Sequence[Sequence] | None = None,
                    ensemble: Sequence | None = None, seed: int = 0) -> dict:
    """Test-time prediction as ``tfpneumo submit`` runs it: ``ensemble_predictor([net])`` of
    the base config's network (random weights, float32) on grey-pixel batches, as submit feeds it.

    ``cases``: ``(size, batch, hflip, batches_per_window, windows)``. The first call (trace and
    first-shape set-up) is reported apart; DICOM decoding (~5 ms an image) is not included.
    ``ensemble``: ``(size, batch, folds, repeats, variants)`` for :func:`bench_ensemble`
    (default :data:`ENSEMBLE_CASE`; ``[]`` skips it).
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
    out = {"rows": rows, "device": device_name()}
    ensemble = ENSEMBLE_CASE[ctx.quick] if ensemble is None else ensemble
    if ensemble:
        try:
            out["ensemble"] = bench_ensemble(*ensemble, seed=seed, first=net)
        except Exception as e:
            out["ensemble"] = {"error": error_line(e)}
    return out


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
    if "ensemble" in result:
        out += rows_ensemble(result["ensemble"])
    return out


# ----------------------------------------------------------------------------- the fold ensemble

# (size, batch, folds, repeats, variants) by quick: the issue 13 comparison at submit's size.
# bfloat16 (a trace of its own) only in the full run. XLA never by default: at 1024 px its
# first call passed 15 GB resident before we stopped it (TF 2.21, CPU); at 256 px it ran at
# 0.6x (--params '{"inference": {"ensemble": [256, 2, 2, 3, ["per-pass", "xla"]]}}').
# Quick leaves it out (~45 s); tests/bench/test_bench.py runs it small.
ENSEMBLE_CASE = {True: (),
                 False: (1024, 2, 2, 5, ("per-pass", "one forward", "bfloat16"))}
VARIANTS = ("per-pass", "one forward", "bfloat16", "xla")


def per_pass_predictor(nets: list):
    """The path ``submit`` took before issue 13, kept to time against: each network on the
    batch, then a second forward on its mirror, mirrored back and averaged; then the folds."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
    def run(images):
        masks, labels = [], []
        for net in nets:
            out = net(images, training=False)
            flipped = net(tf.reverse(images, axis=[2]), training=False)
            masks.append(0.5 * (out["mask"] + tf.reverse(flipped["mask"], axis=[2])))
            labels.append(tf.reshape(0.5 * (out["label"] + flipped["label"]), [-1]))
        return tf.add_n(masks) / len(nets), tf.add_n(labels) / len(nets)

    return run


def bench_ensemble(size: int, batch: int, folds: int, repeats: int,
                   variants: Sequence[str] = VARIANTS[:2], seed: int = 0, first=None) -> dict:
    """A fold ensemble (``folds`` random base networks) with flip TTA at ``size`` px, batch
    ``batch``, through each of ``variants``, timed interleaved (``repeats`` rounds of one
    call each: the machine's drift hits every variant alike):

    * ``per-pass``: :func:`per_pass_predictor` (before issue 13);
    * ``one forward``: :func:`tfpneumo.inference.ensemble.ensemble_predictor`, what submit runs;
    * ``bfloat16``: the same with the networks in ``mixed_bfloat16`` (same weights), as
      ``submit --precision bfloat16`` runs them;
    * ``xla``: the same as ``one forward`` with ``jit_compile=True``.

    Each variant's map is compared with ``per-pass``'s: the largest difference and the pixels
    on the other side of a cut at the median of per-pass's map (random networks' maps sit
    near the mask prior, so a fixed 0.5 would cut nothing). ``first``: fold 0, if built
    already (the base network of seed ``seed``); fold k has seed ``seed + k``.
    """
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    import keras

    from tfpneumo.config import Config
    from tfpneumo.inference.ensemble import ensemble_predictor, ensemble_tta, in_bfloat16
    from tfpneumo.models.unet import build_model

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "per-pass" not in variants:
        raise ValueError(f"variants {list(variants)}: need per-pass, and only {VARIANTS}")
    cfg = base_model_config(Config())
    nets = [] if first is None else [first]
    for k in range(len(nets), folds):
        keras.utils.set_random_seed(seed + k)
        nets.append(build_model(cfg))
    runs = {}
    for name in variants:
        if name == "per-pass":
            runs[name] = per_pass_predictor(nets)
        elif name == "one forward":
            runs[name] = ensemble_predictor(nets, hflip=True)
        elif name == "bfloat16":  # as submit --precision bfloat16 makes them
            runs[name] = ensemble_predictor([in_bfloat16(net) for net in nets], hflip=True)
        else:
            runs[name] = tf.function(lambda x: ensemble_tta(nets, x, True), jit_compile=True,
                                     input_signature=[tf.TensorSpec([None, None, None, 1],
                                                                    tf.float32)])
    images = np.random.default_rng(seed).integers(0, 256, (batch, size, size, 1)).astype(np.float32)
    out: dict[str, Any] = {"size": size, "batch": batch, "folds": folds, "repeats": repeats,
                           "variants": {}}
    maps = {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        maps[name] = run(images)[0].numpy()
        out["variants"][name] = {"first_call_s": time.perf_counter() - t0}
    cut = float(np.median(maps["per-pass"]))
    for name, m in maps.items():
        out["variants"][name].update(
            max_abs_diff=float(np.abs(m - maps["per-pass"]).max()),
            pixels_differ=int(np.count_nonzero((m >= cut) != (maps["per-pass"] >= cut))),
            pixels=int(m.size))
    walls: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(images)[0].numpy()
            walls[name].append(time.perf_counter() - t0)
    for name, w in walls.items():
        out["variants"][name]["img_per_s"] = spread([batch / t for t in w])
    before = out["variants"]["per-pass"]["img_per_s"]["median"]
    for v in out["variants"].values():  # the medians of the same rounds
        v["speedup"] = v["img_per_s"]["median"] / before
    progress(f"inference ensemble {size} px x{batch}, {folds} folds, hflip: " + ", ".join(
        f"{n} {v['img_per_s']['median']:.3f} img/s" for n, v in out["variants"].items()))
    return out


def rows_ensemble(e: dict) -> list[Row]:
    if "error" in e:
        return [Row("fold ensemble, hflip", "failed", e["error"])]
    head = f"{e['size']} px x{e['batch']}, {e['folds']} fold{'s' if e['folds'] != 1 else ''}, hflip"
    labels = {"per-pass": f"{head}: per-pass (before issue 13)",
              "one forward": "  image + mirror in one forward per fold (submit)",
              "bfloat16": "  same, networks in mixed_bfloat16",
              "xla": "  same, XLA (jit_compile)"}
    rows = []
    for name, v in e["variants"].items():
        s = v["img_per_s"]
        figure = f"{s['median']:.3f} img/s{span(s, '.3f')}"
        note = f"first call {v['first_call_s']:.0f} s"
        if name != "per-pass":
            figure += f": {v['speedup']:.2f}x"
            same = ("maps bit-identical" if v["max_abs_diff"] == 0 else
                    f"max |map diff| {v['max_abs_diff']:.2g}, {v['pixels_differ']} of "
                    f"{v['pixels']} pixels cross the median cut")
            note = f"{same}; {note}"
        else:
            note += f"; medians of {e['repeats']} interleaved rounds"
        rows.append(Row(labels[name], figure, note))
    return rows
