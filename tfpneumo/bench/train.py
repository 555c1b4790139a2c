"""The ``train`` section: images/s of the train step, each setting in its own process."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence

import numpy as np

from tfpneumo.bench.harness import (
    SECTION_TIMEOUT_S,
    TRAIN_CASES,
    Context,
    Row,
    device_name,
    error_line,
    progress,
    rate,
    run_child,
    span,
    spread,
)
from tfpneumo.bench.synthetic import REFERENCE_OVERRIDES, base_model_config, random_batch

# The PyTorch reference's setting, always timed: the peer section runs that network beside it.
REFERENCE_SETTING = (256, 4, "reference", "float32", False)


def resolve_precision(precision: str, gpu: bool) -> str:
    """``mixed`` -> mixed_float16 on a GPU, mixed_bfloat16 on a CPU; other names unchanged."""
    if precision == "mixed":
        return "mixed_float16" if gpu else "mixed_bfloat16"
    return precision


def bench_trainer(size: int, batch: int, precision: str, xla: bool, layout: str, seed: int = 0):
    """The compiled Trainer a train setting times: the base config's network (random encoder
    weights), optimizer and loss, or the PyTorch reference's layout, built on a random batch."""
    import keras

    from tfpneumo import compat
    from tfpneumo.config import load_config
    from tfpneumo.models.unet import build_model, encoder_layers
    from tfpneumo.training.losses import build_losses
    from tfpneumo.training.trainer import Trainer, build_optimizer

    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy(precision)
    cfg = load_config(None, REFERENCE_OVERRIDES if layout == "reference" else [])
    net = build_model(base_model_config(cfg))
    trainer = Trainer(net, accumulation_steps=1)
    encoder_paths = {v.path for layer in encoder_layers(net) for v in layer.weights}
    optimizer = build_optimizer(cfg, cfg.optimizer.lr, encoder_paths, precision)
    losses, loss_weights = build_losses(cfg.loss)
    trainer.compile(optimizer=optimizer, loss=losses, loss_weights=loss_weights, jit_compile=xla)
    compat.symbolic_build(trainer, random_batch(size, batch, seed))
    return trainer


def train_case(size: int, batch: int, precision: str, xla: bool, seconds: float,
               windows: int = 3, steps: int | None = None, seed: int = 0,
               layout: str = "base") -> dict:
    """Images/s of the train step in the training loop for one setting (run it in a fresh
    process).

    The network of the base config (``layout="base"``, random encoder weights), its loss and
    optimizer, or the PyTorch reference's layout (``"reference"``), on an in-memory batch
    repeated (no input cost). The first step traces and compiles (``compile_s``); a second
    sizes the windows (``steps`` optimizer steps, else as many as take about ``seconds``);
    then, in the same loop, a warm step and ``windows`` windows: their median, min and max
    images/s and images per process CPU-second. ``{"error": ...}`` when it does not run here.
    """
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    import keras

    from tfpneumo.training import loop

    precision = resolve_precision(precision, bool(tf.config.list_physical_devices("GPU")))
    row: dict = {"size": size, "batch": batch, "precision": precision, "xla": xla,
                 "layout": layout, "device": device_name()}
    try:
        trainer = bench_trainer(size, batch, precision, xla, layout, seed)
        ds = tf.data.Dataset.from_tensors(random_batch(size, batch, seed)).repeat()
        marks: list[tuple[float, float]] = []  # wall and process CPU time after every step
        plan: dict[str, int] = {}

        class Clock(keras.callbacks.Callback):
            """Times every step; after the first two (the trace, then a warm step) sizes the
            windows and stops the loop after one more warm step and ``windows`` windows."""

            def on_train_batch_end(self, step, logs=None):
                marks.append((time.perf_counter(), time.process_time()))
                loss = float(keras.ops.convert_to_numpy(logs["loss"]))
                if not np.isfinite(loss):
                    raise FloatingPointError(f"loss {loss}")
                if step == 1:
                    plan["n"] = steps or max(1, round(seconds / (marks[1][0] - marks[0][0])))
                if "n" in plan and step + 1 >= 3 + plan["n"] * windows:
                    self.model.stop_training = True

        t0 = time.perf_counter()
        # The training loop `tfpneumo train` runs (tfpneumo.training.loop), one call.
        loop.fit(trainer, tf.distribute.get_strategy(), lambda _: ds, epochs=1, initial_epoch=0,
                 steps_per_epoch=10**9, callbacks=[Clock()], verbose=0, jit_compile=xla)
        row["compile_s"] = marks[0][0] - t0
        n = plan["n"]
        bounds = marks[2::n]  # after the second warm step, then after each window of n steps
        walls = [b[0] - a[0] for a, b in zip(bounds, bounds[1:], strict=False)]
        cpus = [b[1] - a[1] for a, b in zip(bounds, bounds[1:], strict=False)]
        row.update(img_per_s=spread([n * batch / wall for wall in walls]),
                   img_per_cpu_s=rate(n * batch, statistics.median(cpus)),
                   steps=n, windows=windows)
    except Exception as e:  # a setting that does not run here is a result, not a crash
        row["error"] = error_line(e)
    return row


def bench_train(ctx: Context, *, cases: Sequence[Sequence[int]] | None = None,
                precisions: Sequence[str] | None = None, xla: Sequence[bool] | None = None,
                seconds: float | None = None, windows: int | None = None,
                steps: int | None = None, layouts: Sequence[str] | None = None) -> dict:
    """:func:`train_case` for every (size x batch, layout, precision, XLA) setting, each in its
    own process, plus the PyTorch reference's setting (256x4, reference layout, float32).
    Quick: 256x4 base layout mixed (bf16 on CPU) beside the reference float32, XLA off, 3
    windows of ~2 s.
    Full: 256x4, 256x8, 512x4 x float32/mixed x XLA off/on, 5 windows of ~10 s."""
    cases = [tuple(c) for c in (cases or TRAIN_CASES[ctx.quick])]
    precisions = list(precisions or (("mixed",) if ctx.quick else ("float32", "mixed")))
    xla = [bool(x) for x in xla] if xla is not None else ([False] if ctx.quick else [False, True])
    seconds = seconds or (2.0 if ctx.quick else 10.0)
    windows = windows or (3 if ctx.quick else 5)
    settings = [(size, batch, layout, precision, jit) for size, batch in cases
                for layout in (layouts or ("base",)) for precision in precisions for jit in xla]
    if layouts is None and REFERENCE_SETTING not in settings:
        settings.insert(0, REFERENCE_SETTING)
    rows = []
    for size, batch, layout, precision, jit in settings:
        spec = {"size": size, "batch": batch, "precision": precision, "xla": jit,
                "seconds": seconds, "windows": windows, "steps": steps, "layout": layout}
        row = run_child(["--case", json.dumps(spec)], SECTION_TIMEOUT_S[ctx.quick])
        if row.get("status") == "error":  # the process died: no row of its own
            row = {**spec, "error": row["error"]}
        rows.append(row)
        done = (f"{row['img_per_s']['median']:.2f} img/s" if "error" not in row
                else f"failed: {row['error']}")
        progress(f"train {size}x{batch} {layout} {row['precision']} XLA {'on' if jit else 'off'}: "
                 f"{done}")
    return {"rows": rows,
            "device": next((r["device"] for r in rows if "device" in r), None)}


def rows_train(result: dict) -> list[Row]:
    out = []
    for r in result["rows"]:
        layout = r.get("layout", "base")
        setting = (f"{r['size']} px x{r['batch']}, {layout} layout, {r['precision']}, "
                   f"XLA {'on' if r['xla'] else 'off'}")
        if "error" in r:
            out.append(Row(setting, "failed", r["error"], r.get("peak_rss_mb")))
            continue
        s, per_cpu = r["img_per_s"], r["img_per_cpu_s"]
        note = (f"{per_cpu:.2f} img/CPU-s; " if per_cpu else "") + f"compile {r['compile_s']:.0f} s"
        out.append(Row(setting, f"{s['median']:.2f} img/s{span(s, '.2f')}", note,
                       r.get("peak_rss_mb")))
    return out
