"""Training speed (images/s) of the real network through ``tfpneumo.trainer.Trainer``.

The network of ``configs/base.yaml`` (UNet-ResNet34 with scSE and the classification head,
random encoder weights), the training loss (``build_losses``, default combo), the project's
optimizer (``build_optimizer``: layer-wise AdamW, clipnorm; loss scaling under mixed_float16)
and the train step of ``Trainer``, run by ``Trainer.fit`` on an in-memory batch of random
images repeated (no input-pipeline cost). Each (size, batch, precision, XLA) setting runs in
its own process: the first ``fit`` call traces and compiles (``compile s``), two single steps
warm up and size the windows (about ``--seconds`` each), then the median of 3 timed windows,
also per process CPU-second (all threads), which depends less on other load on a shared
machine. Runs on the default device (one CPU here). Reference: the same UNet-ResNet34 in
PyTorch trains at ~3.8 img/s at 256 px, batch 4 on the project's 2-core CPU machine
(GUIDE.md).

    python scripts/bench_train.py --quick    # 256 px, batch 4, float32/bf16, XLA off/on
    python scripts/bench_train.py --out bench_train.json  # full grid (~1 h on 2 cores)
    python scripts/bench_train.py --cases 256x4 --precisions float32 --xla off --seconds 5
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
FULL_CASES = ((256, 4), (256, 8), (512, 4))
PYTORCH_REFERENCE = "PyTorch UNet-ResNet34, 256 px, batch 4: ~3.8 img/s (GUIDE.md)"


def random_batch(size: int, batch: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """``(x, y)``: x ``(B, S, S, 3) float32`` ~N(0, 1) (ImageNet-normalised range), y with
    ``mask (B, S, S, 1)`` rectangles on every other image and ``label (B, 1)``, float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    mask = np.zeros((batch, size, size, 1), np.float32)
    for i in range(0, batch, 2):
        top, left = rng.integers(0, size // 2, 2)
        mask[i, top:top + size // 4, left:left + size // 6] = 1.0
    return x, {"mask": mask, "label": mask.max(axis=(1, 2))}


def bench_case(size: int, batch: int, precision: str, xla: bool, seconds: float,
               windows: int = 3, steps: int | None = None, seed: int = 0) -> dict:
    """Images/s of ``Trainer.fit`` for one setting (run it in a fresh process).

    Windows of ``steps`` optimizer steps, or as many as take about ``seconds``.
    Returns the median, min and max over ``windows`` windows, images per CPU-second, the
    compile time; or ``{"error": ...}`` when the setting does not run here.
    """
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    import keras

    from tfpneumo.config import Config, ModelConfig
    from tfpneumo.losses import build_losses
    from tfpneumo.models.unet import build_model, encoder_layers
    from tfpneumo.trainer import Trainer, build_optimizer

    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy(precision)
    row: dict = {"size": size, "batch": batch, "precision": precision, "xla": xla}
    try:
        cfg = Config()  # the base config's network, optimizer and loss
        net = build_model(ModelConfig(encoder_weights="none"))
        trainer = Trainer(net, accumulation_steps=1)
        encoder_paths = {v.path for layer in encoder_layers(net) for v in layer.weights}
        optimizer = build_optimizer(cfg, cfg.optimizer.lr, encoder_paths, precision)
        losses, loss_weights = build_losses(cfg.loss)
        trainer.compile(optimizer=optimizer, loss=losses, loss_weights=loss_weights,
                        jit_compile=xla)
        ds = tf.data.Dataset.from_tensors(random_batch(size, batch, seed)).repeat()

        def window(n: int) -> tuple[float, float]:
            """Wall and process CPU seconds of ``n`` steps."""
            t0, c0 = time.perf_counter(), time.process_time()
            history = trainer.fit(ds, epochs=1, steps_per_epoch=n, verbose=0, shuffle=False)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            loss = history.history["loss"][-1]
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss {loss}")
            return elapsed, cpu

        row["compile_s"] = window(1)[0]  # traces, optimises (and XLA-compiles) the step
        window(1)  # warm-up: oneDNN primitive caches, allocator
        n = steps or max(1, round(seconds / window(1)[0]))
        timed = [window(n) for _ in range(windows)]
        rates = [n * batch / wall for wall, _ in timed]
        row.update(img_per_s=statistics.median(rates), min=min(rates), max=max(rates),
                   img_per_cpu_s=statistics.median(n * batch / cpu for _, cpu in timed),
                   steps=n, windows=windows)
    except Exception as e:  # a setting that does not run here is a result, not a crash
        # TF puts the cause last, after the traceback of the traced function; XLA errors
        # carry it in the line before "[[{{node ...}}]]"
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        causes = [line for line in lines if not line.startswith(("[[", "File ", "Detected at"))]
        row["error"] = f"{type(e).__name__}: {(causes or lines or [''])[-1][:300]}"
    return row


def run_isolated(size: int, batch: int, precision: str, xla: bool, seconds: float,
                 windows: int, steps: int | None) -> dict:
    """:func:`bench_case` in a fresh Python process (no state or memory carried over)."""
    spec = json.dumps({"size": size, "batch": batch, "precision": precision, "xla": xla,
                       "seconds": seconds, "windows": windows, "steps": steps})
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True,
                          text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return {"size": size, "batch": batch, "precision": precision, "xla": xla,
            "error": f"process exited with {proc.returncode}: {tail}"}


def parse_case(text: str) -> tuple[int, int]:
    """``"256x4"`` -> ``(256, 4)`` (size x batch)."""
    try:
        size, batch = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIZExBATCH, e.g. 256x4") from None
    if size % 32 or size <= 0 or batch <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: size must be a multiple of 32, batch > 0")
    return size, batch


def machine() -> dict:
    flags = ""
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "avx512_fp16": "avx512_fp16" in flags,
            "tensorflow": importlib.metadata.version("tensorflow"),
            "keras": importlib.metadata.version("keras"),
            "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'size':>5} {'batch':>5} {'precision':>15} {'XLA':>4} {'img/s':>7} "
          f"{'min':>6} {'max':>6} {'img/CPU-s':>9} {'compile s':>9}")
    for r in rows:
        xla = "on" if r["xla"] else "off"
        head = f"{r['size']:>5} {r['batch']:>5} {r['precision']:>15} {xla:>4}"
        if "error" in r:
            print(f"{head}  failed: {r['error']}")
        else:
            print(f"{head} {r['img_per_s']:>7.2f} {r['min']:>6.2f} {r['max']:>6.2f} "
                  f"{r['img_per_cpu_s']:>9.2f} {r['compile_s']:>9.1f}")
    print(f"reference: {PYTORCH_REFERENCE}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="256x4 only, float32 and mixed_bfloat16, XLA off and on")
    parser.add_argument("--cases", type=parse_case, nargs="+", default=None,
                        help="SIZExBATCH settings (default 256x4 256x8 512x4)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None)
    parser.add_argument("--xla", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="approximate length of a timed window")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per timed window (overrides --seconds)")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one setting, JSON spec
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(bench_case(**json.loads(args.one))), flush=True)
        return

    cases = args.cases or ([(256, 4)] if args.quick else list(FULL_CASES))
    precisions = args.precisions or (PRECISIONS[:2] if args.quick else PRECISIONS)
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, avx512_bf16={info['avx512_bf16']}, "
          f"amx_bf16={info['amx_bf16']}, avx512_fp16={info['avx512_fp16']}, "
          f"TF {info['tensorflow']}, Keras {info['keras']}, "
          f"load average {info['load_avg_at_start']}", flush=True)
    rows = []
    for size, batch in cases:
        for precision in precisions:
            for xla in args.xla:
                row = run_isolated(size, batch, precision, xla == "on", args.seconds,
                                   args.windows, args.steps)
                rows.append(row)
                done = (f"{row['img_per_s']:.2f} img/s, {row['img_per_cpu_s']:.2f} img/CPU-s "
                        f"(compile {row['compile_s']:.0f} s)"
                        if "error" not in row else f"failed: {row['error']}")
                print(f"  {size} px batch {batch} {precision} XLA {xla}: {done}", flush=True)
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps({"machine": info, "results": rows}, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
