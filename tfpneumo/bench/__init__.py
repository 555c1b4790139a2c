"""``tfpneumo bench``: one benchmark report of this machine; every figure measured in one run.

Sections, each run in its own fresh Python process (``python -m tfpneumo.bench --section
NAME``), so its peak resident memory is its own and no TensorFlow state carries over:

* ``prepare``: real 1024 JPEG-Baseline DICOMs (siim-mini) to a 512 cache with
  :func:`tfpneumo.data.prepare.prepare_cache`, 1 worker and all cores.
* ``pipeline``: :func:`tfpneumo.data.pipeline.train_dataset` with the default augmentations on
  a synthetic cache, per ``num_parallel_calls``; target >= 60 img/s per core at 512.
* ``train``: the train step of :class:`tfpneumo.training.trainer.Trainer` (each setting in its own
  process): precision, XLA, batch size, against the PyTorch reference.
* ``inference``: :func:`tfpneumo.inference.ensemble_predictor` as ``tfpneumo submit`` uses it,
  at 1024 with horizontal-flip TTA, and at 256 px batch 4 (the training parity setting).
* ``threshold``: the rule search of ``tfpneumo evaluate``, 12,000 images x >= 1,000 triplets.

Then the ratio of the input-pipeline rate to the training-step rate at the same image size
says whether the network would wait for its input on this machine.

Adding a section: one function ``bench_<name>(ctx, **params) -> dict`` (runs in the child
process; return ``{"skipped": reason}`` to skip), one ``rows_<name>(result) -> list[Row]`` for
the table and one :data:`SECTIONS` entry.

    python -m tfpneumo.bench --quick --out bench.json   # ~2.5 min on 2 cores
    python -m tfpneumo.bench --out bench.json           # full grid, ~25-30 min on 2 cores
    python -m tfpneumo.bench --sections threshold pipeline --params '{"pipeline": {"sizes": [512]}}'
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tfpneumo.errors import TfpneumoError

AUTOTUNE = -1
PIPELINE_TARGET_PER_CORE = 60.0  # img/s per core at 512 (issue: the pipeline must not starve)
THRESHOLD_TARGET_S = 5.0  # full rule search, 12,000 images x 1,000 triplets
PYTORCH_REFERENCE = {"size": 256, "batch": 4, "precision": "float32", "img_per_s": 3.8,
                     "text": "PyTorch UNet-ResNet34 ~3.8 img/s here (GUIDE.md), same layout"}
TRAIN_FULL_CASES = ((256, 4), (256, 8), (512, 4))
SECTION_TIMEOUT_S = {True: 900.0, False: 4 * 3600.0}  # per section process, by quick


class BenchError(TfpneumoError):
    """A benchmark option cannot be used (unknown section, bad parameter)."""


@dataclass(frozen=True)
class Context:
    """What every section gets: the mode and where the real DICOMs are (None: not found)."""

    quick: bool
    siim_mini: Path | None = None


@dataclass(frozen=True)
class Row:
    """One table row: ``setting``, the measured ``figure``, a ``note``; ``rss_mb`` when the
    row has its own process (train settings), else the section's peak is shown."""

    setting: str
    figure: str
    note: str = ""
    rss_mb: float | None = None


@dataclass(frozen=True)
class Section:
    title: str
    run: Callable[..., dict]  # (ctx: Context, **params) -> JSON-able dict
    rows: Callable[[dict], list[Row]]


# ----------------------------------------------------------------------------- small helpers

def cores() -> int:
    """Cores this process may use (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def spread(values: Sequence[float]) -> dict:
    """``{"median", "min", "max", "n"}`` of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def rate(count: float, seconds: float) -> float | None:
    """``count / seconds``, None when nothing was timed (keeps the JSON finite)."""
    return count / seconds if seconds > 0 else None


def _vm_hwm_mb(pid: int | str = "self") -> float | None:
    """Peak resident memory (VmHWM) of one process in MB, None when unreadable.

    Not ``ru_maxrss``: on Linux a forked child starts with its parent's peak, so a spawn
    worker of a process that holds TensorFlow would report at least that process's size.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (from /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                found = [int(c) for c in children.read_text().split()]
                out += found
                todo += found
    return out


class ChildrenPeak:
    """Samples the peak memory (VmHWM) of this process's descendants every ``interval`` s
    in a thread, while in the ``with`` block (a child's growth in its last interval can be
    missed). ``mb``: the largest seen, None when no child ran."""

    def __init__(self, interval: float = 0.25) -> None:
        import threading

        self.interval, self.mb = interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for pid in _descendants(os.getpid()):
            mb = _vm_hwm_mb(pid)
            if mb is not None and (self.mb is None or mb > self.mb):
                self.mb = mb

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> ChildrenPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def peak_rss(children: float | None = None) -> dict:
    """``peak_rss_mb`` of this process (VmHWM; ``ru_maxrss`` where /proc is missing) and
    ``children_peak_rss_mb``, the largest child process seen (None: none ran)."""
    kib = 1024.0  # ru_maxrss is in KiB on Linux
    ru_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib
    ru_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib
    own = _vm_hwm_mb()
    # ru_maxrss kept for reference; it includes the parent's size at fork (see _vm_hwm_mb)
    return {"peak_rss_mb": ru_self if own is None else own, "children_peak_rss_mb": children,
            "ru_maxrss_mb": ru_self, "ru_maxrss_children_mb": ru_children}


def error_line(e: BaseException) -> str:
    """``Type: message`` in one line. TensorFlow's messages start with a generic line
    ("Graph execution error:") and carry the cause last, before ``[[{{node ...}}]]``."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1 and (text.endswith(":") or text.startswith(("Graph execution", "Detected at"))):
        causes = [line for line in lines
                  if not line.startswith(("[[", "File ", "Detected at", "Graph execution"))]
        text = (causes or lines)[-1]
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def device_name() -> str:
    """The device TensorFlow runs the network on here: ``GPU:0 (name)`` or ``CPU``."""
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"GPU:0 ({details.get('device_name', 'unknown')}), {len(gpus)} GPU(s)"


def resolve_siim_mini(path: Path | None = None) -> Path:
    """``path``, else ``$TFPNEUMO_SIIM/siim-mini``, else ``shared/siim/siim-mini`` beside the
    checkout (as the tests find it), else ``../shared/siim/siim-mini`` from the current folder."""
    if path is not None:
        return Path(path)
    if os.environ.get("TFPNEUMO_SIIM"):
        return Path(os.environ["TFPNEUMO_SIIM"]) / "siim-mini"
    beside_checkout = Path(__file__).resolve().parents[3] / "shared" / "siim" / "siim-mini"
    if beside_checkout.is_dir():
        return beside_checkout
    return Path("..") / "shared" / "siim" / "siim-mini"


def machine_info() -> dict:
    """CPU model and flags, cores, library versions, load; without importing TensorFlow."""
    model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    model = model or platform.processor() or platform.machine()

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"cpu": model, "cores": cores(), "cpu_count": os.cpu_count(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "python": platform.python_version(), "tensorflow": version("tensorflow"),
            "keras": version("keras"), "numpy": version("numpy"),
            "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def run_child(args: list[str], timeout: float) -> dict:
    """``python -m tfpneumo.bench ARGS --json-out FILE`` in a fresh process; its JSON.

    The child's stdout (progress lines) goes to our stderr, its stderr (TensorFlow's chatter)
    to a file whose last line becomes the error when the child dies without a result. On a
    timeout or Ctrl-C the child's whole process group (its workers too) is killed.
    """
    with tempfile.TemporaryDirectory(prefix="tfpneumo-bench-") as tmp:
        out, err = Path(tmp) / "result.json", Path(tmp) / "stderr.txt"
        cmd = [sys.executable, "-m", "tfpneumo.bench", *args, "--json-out", str(out)]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "SM_FRAMEWORK": "tf.keras"}
        try:
            progress = _progress_stream.fileno()
        except (AttributeError, OSError, ValueError):  # captured stream (pytest): inherit
            progress = None
        with open(err, "w") as f_err:
            proc = subprocess.Popen(cmd, stdout=progress, stderr=f_err, env=env,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except BaseException as e:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if isinstance(e, subprocess.TimeoutExpired):
                    return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
                raise
        if code == 0 and out.exists():
            return json.loads(out.read_text())
        lines = [line for line in err.read_text(errors="replace").splitlines() if line.strip()]
        tail = lines[-1].strip()[:300] if lines else "no output"
        return {"status": "error", "error": f"process exited with {code}: {tail}"}


# Progress lines: stderr in the top process (its stdout is the table); a child's stdout, which
# its parent points at its own progress stream.
_progress_stream = sys.stderr


def _progress(text: str) -> None:
    print(f"[bench] {text}", file=_progress_stream, flush=True)


# ----------------------------------------------------------------------------- prepare

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
                counts = json.loads((out / "manifest.json").read_text())["counts"]
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
            _progress(f"prepare, {n_workers} worker(s): {rows[-1]['img_per_s']:.1f} img/s")
    return {"source": str(mini), "size": size, "repeats": repeats, "rows": rows}


def rows_prepare(result: dict) -> list[Row]:
    out = []
    for r in result["rows"]:
        w = r["wall_s"]
        out.append(Row(
            f"{r['images']} DICOMs 1024 -> {result['size']} cache, {r['workers']} worker(s)",
            f"{r['img_per_s']:.1f} img/s ({r['img_per_s_per_core']:.1f}/core)",
            f"{w['median']:.1f} s{_range(w, '.1f')}, of which start-up + planning ~"
            f"{r['startup_s']:.1f} s; steady {r['steady_img_per_s'] or 0:.0f} img/s "
            f"({r['steady_img_per_s_per_worker'] or 0:.0f} per worker, from shard timings)"))
    return out


# ----------------------------------------------------------------------------- input pipeline

def build_synthetic_cache(folder: Path, size: int, n_images: int, folds: int = 2,
                          shard_size: int = 50, seed: int = 0) -> None:
    """A training cache of ``n_images`` random ``(size, size)`` uint8 images (25 % positive,
    rectangle masks) in ``folds`` folds, in the layout of :mod:`tfpneumo.data.records`."""
    from tfpneumo.data import records
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[int, bool], list[int]] = {}
    for i in range(n_images):
        groups.setdefault((i % folds, i % 4 == 0), []).append(i)
    for (fold, positive), items in sorted(groups.items()):
        for k in range(0, len(items), shard_size):
            shard = folder / records.train_shard_name(fold, positive, k // shard_size)
            ids = []
            with tf.io.TFRecordWriter(str(shard)) as writer:
                for i in items[k:k + shard_size]:
                    # Blocky content plus noise (not pure noise): realistic PNG and resampling cost.
                    base = rng.integers(0, 256, (max(1, size // 8),) * 2, dtype=np.uint8)
                    image = np.kron(base, np.ones((8, 8), np.uint8))[:size, :size]
                    image = image + rng.integers(0, 16, image.shape, dtype=np.uint8)
                    mask = np.zeros((size, size), np.uint8)
                    if positive:
                        y, x = rng.integers(0, size // 2, 2)
                        mask[y:y + size // 4, x:x + size // 6] = 1
                    image_id = f"img{i:05d}"
                    writer.write(records.serialize_example(image_id, image, mask, int(positive),
                                                           fold, int(positive)))
                    ids.append(image_id)
            records.sidecar_path(shard).write_text(json.dumps({"ids": ids, "skipped": []}))


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
    """``train_dataset`` (default augmentations, positive-rate schedule, in-memory cache) on a
    synthetic cache of the same side as the output, per ``(num_parallel_calls, threads)``
    setting (default: (1, 1), (2, 2), (AUTOTUNE, cores); quick: (1, 1), (AUTOTUNE, cores))."""
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
        for size in sizes:
            cache = Path(tmp) / f"cache{size}"
            build_synthetic_cache(cache, size, images)
            for npc, threads in settings:
                row: dict[str, Any] = {"size": size, "npc": npc, "threads": threads, "batch": batch,
                                       "batches": batches, "repeats": repeats}
                try:
                    row.update(time_pipeline(cache, size, npc, threads, batch, batches, repeats,
                                             vectorize, in_memory))
                    _progress(f"pipeline {size} px npc={_npc(npc)}: "
                              f"{row['img_per_s']['median']:.1f} img/s")
                except Exception as e:  # one setting failing is a result, not a crash
                    row["error"] = error_line(e)
                rows.append(row)
            with contextlib.suppress(OSError):
                for p in cache.iterdir():
                    p.unlink()
    return {"images": images, "vectorize": vectorize, "in_memory": in_memory,
            "target_per_core_512": PIPELINE_TARGET_PER_CORE, "device": device_name(),
            "rows": rows}


def _npc(npc: int) -> str:
    return "AUTOTUNE" if npc == AUTOTUNE else str(npc)


def _range(s: dict, fmt: str) -> str:
    """`` [min-max]`` of a repeated measurement, empty for a single one."""
    return f" [{s['min']:{fmt}}-{s['max']:{fmt}}]" if s.get("n", 1) > 1 else ""


def rows_pipeline(result: dict) -> list[Row]:
    out = []
    for r in result["rows"]:
        setting = (f"{r['size']} px, batch {r['batch']}, npc {_npc(r['npc'])}, "
                   f"{r['threads']} thread(s)")
        if "error" in r:
            out.append(Row(setting, "failed", r["error"]))
            continue
        s, per_cpu = r["img_per_s"], r["img_per_cpu_s"]
        note = f"{per_cpu:.1f} img/CPU-s" if per_cpu else ""
        if r["size"] == 512 and per_cpu:
            met = "met" if per_cpu >= PIPELINE_TARGET_PER_CORE else "NOT met"
            note += f"; target >= {PIPELINE_TARGET_PER_CORE:.0f} img/s per core: {met}"
        out.append(Row(setting, f"{s['median']:.1f} img/s{_range(s, '.0f')}", note))
    return out


# ----------------------------------------------------------------------------- train step

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


def resolve_precision(precision: str, gpu: bool) -> str:
    """``mixed`` -> mixed_float16 on a GPU, mixed_bfloat16 on a CPU; other names unchanged."""
    if precision == "mixed":
        return "mixed_float16" if gpu else "mixed_bfloat16"
    return precision


# The PyTorch reference's layout (GUIDE.md): UNet-ResNet34 without attention or skip dropout,
# BCE on the mask of every image and on the label, AdamW.
REFERENCE_OVERRIDES = ["model.attention=none", "model.skip_dropout=0", "loss.mask=bce",
                       "loss.mask_positives_only=false"]


def train_case(size: int, batch: int, precision: str, xla: bool, seconds: float,
               windows: int = 3, steps: int | None = None, seed: int = 0,
               layout: str = "base") -> dict:
    """Images/s of ``Trainer.fit`` for one setting (run it in a fresh process).

    The network of the base config (``layout="base"``, random encoder weights), its loss and
    optimizer, or the PyTorch reference's layout (``"reference"``), on an in-memory batch
    repeated (no input cost). The first step traces and compiles (``compile_s``); a second
    sizes the windows (``steps`` optimizer steps, else as many as take about ``seconds``);
    then, in one ``fit`` call, a warm step and ``windows`` windows: their median, min and max
    images/s and images per process CPU-second. ``{"error": ...}`` when it does not run here.
    """
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    import keras

    from tfpneumo.config import load_config
    from tfpneumo.models.unet import build_model, encoder_layers
    from tfpneumo.training.losses import build_losses
    from tfpneumo.training.trainer import Trainer, build_optimizer

    precision = resolve_precision(precision, bool(tf.config.list_physical_devices("GPU")))
    row: dict = {"size": size, "batch": batch, "precision": precision, "xla": xla,
                 "layout": layout, "device": device_name()}
    try:
        keras.utils.set_random_seed(seed)
        keras.mixed_precision.set_global_policy(precision)
        # the base config's network, optimizer and loss, or the PyTorch reference's layout
        cfg = load_config(None, REFERENCE_OVERRIDES if layout == "reference" else [])
        net = build_model(_base_model_config(cfg))
        trainer = Trainer(net, accumulation_steps=1)
        encoder_paths = {v.path for layer in encoder_layers(net) for v in layer.weights}
        optimizer = build_optimizer(cfg, cfg.optimizer.lr, encoder_paths, precision)
        losses, loss_weights = build_losses(cfg.loss)
        trainer.compile(optimizer=optimizer, loss=losses, loss_weights=loss_weights, jit_compile=xla)
        ds = tf.data.Dataset.from_tensors(random_batch(size, batch, seed)).repeat()

        class Clock(keras.callbacks.Callback):
            """Wall and process CPU time at the end of every step."""

            def on_train_batch_end(self, batch, logs=None):
                marks.append((time.perf_counter(), time.process_time()))

        def run(n: int) -> None:
            history = trainer.fit(ds, epochs=1, steps_per_epoch=n, verbose=0, shuffle=False,
                                  callbacks=[Clock()])
            loss = history.history["loss"][-1]
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss {loss}")

        marks: list[tuple[float, float]] = []
        t0 = time.perf_counter()
        run(2)  # traces and optimises (and XLA-compiles) the step, then one warm step
        row["compile_s"] = marks[0][0] - t0
        n = steps or max(1, round(seconds / (marks[1][0] - marks[0][0])))
        # One fit call for every window: Keras' per-call start-up is not a training cost.
        marks.clear()
        run(1 + n * windows)
        bounds = marks[::n]  # after the warm step, then after each window of n steps
        walls = [b[0] - a[0] for a, b in zip(bounds, bounds[1:], strict=False)]
        cpus = [b[1] - a[1] for a, b in zip(bounds, bounds[1:], strict=False)]
        row.update(img_per_s=spread([n * batch / wall for wall in walls]),
                   img_per_cpu_s=rate(n * batch, statistics.median(cpus)),
                   steps=n, windows=windows)
    except Exception as e:  # a setting that does not run here is a result, not a crash
        row["error"] = error_line(e)
    return row


def _base_model_config(cfg):
    """The base config's network with random encoder weights (no download)."""
    import dataclasses

    return dataclasses.replace(cfg.model, encoder_weights="none")


def bench_train(ctx: Context, *, cases: Sequence[Sequence[int]] | None = None,
                precisions: Sequence[str] | None = None, xla: Sequence[bool] | None = None,
                seconds: float | None = None, windows: int | None = None,
                steps: int | None = None, layouts: Sequence[str] | None = None) -> dict:
    """:func:`train_case` for every (size x batch, layout, precision, XLA) setting, each in its
    own process, plus the PyTorch reference's setting (256x4, reference layout, float32).
    Quick: 256x4 base layout float32 and mixed (bf16 on CPU), XLA off, 3 windows of ~2 s.
    Full: 256x4, 256x8, 512x4 x float32/mixed x XLA off/on, 5 windows of ~10 s."""
    cases = [tuple(c) for c in cases] if cases else ([(256, 4)] if ctx.quick else list(TRAIN_FULL_CASES))
    precisions = list(precisions or ("float32", "mixed"))
    xla = [bool(x) for x in xla] if xla is not None else ([False] if ctx.quick else [False, True])
    seconds = seconds or (2.0 if ctx.quick else 10.0)
    windows = windows or (3 if ctx.quick else 5)
    settings = [(size, batch, layout, precision, jit) for size, batch in cases
                for layout in (layouts or ("base",)) for precision in precisions for jit in xla]
    ref = (PYTORCH_REFERENCE["size"], PYTORCH_REFERENCE["batch"], "reference", "float32", False)
    if layouts is None and ref not in settings:
        settings.insert(0, ref)
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
        _progress(f"train {size}x{batch} {layout} {row['precision']} XLA {'on' if jit else 'off'}: "
                  f"{done}")
    return {"rows": rows, "reference": PYTORCH_REFERENCE,
            "device": next((r["device"] for r in rows if "device" in r), None)}


def rows_train(result: dict) -> list[Row]:
    ref = result.get("reference", PYTORCH_REFERENCE)
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
        if (r["size"], r["batch"], layout, r["precision"]) == (ref["size"], ref["batch"], "reference",
                                                                ref["precision"]):
            note += f"; {s['median'] / ref['img_per_s']:.2f}x the ref: {ref['text']}"
        out.append(Row(setting, f"{s['median']:.2f} img/s{_range(s, '.2f')}", note,
                       r.get("peak_rss_mb")))
    return out


# ----------------------------------------------------------------------------- inference

def bench_inference(ctx: Context, *, cases: Sequence[Sequence] | None = None, seed: int = 0) -> dict:
    """Test-time prediction as ``tfpneumo submit`` runs it: ``ensemble_predictor([net])`` of
    the base config's network (random weights, float32) on ``normalize``-d uint8 batches.

    ``cases``: ``(size, batch, hflip, batches_per_window, windows)``. The first call (trace and
    first-shape set-up) is reported apart; DICOM decoding (~5 ms an image) is not included.
    """
    from tfpneumo.tfimport import quiet_tensorflow

    quiet_tensorflow()
    import keras

    from tfpneumo.config import Config
    from tfpneumo.data.pipeline import normalize
    from tfpneumo.inference.ensemble import ensemble_predictor
    from tfpneumo.models.unet import build_model

    if cases is None:
        cases = ([(1024, 2, True, 1, 2), (256, 4, False, 2, 3)] if ctx.quick else
                 [(1024, 2, True, 2, 3), (1024, 2, False, 2, 3), (256, 4, False, 5, 3),
                  (256, 4, True, 5, 3)])
    keras.utils.set_random_seed(seed)
    net = build_model(_base_model_config(Config()))
    rng = np.random.default_rng(seed)
    rows = []
    for size, batch, hflip, per_window, windows in cases:
        row: dict[str, Any] = {"size": size, "batch": batch, "hflip": bool(hflip),
                               "batches_per_window": per_window, "windows": windows}
        try:
            images = rng.integers(0, 256, (batch, size, size, 1), dtype=np.uint8)
            predictor = ensemble_predictor([net], hflip=bool(hflip))

            def call(images=images, predictor=predictor) -> None:
                probs, labels = predictor(normalize(images))
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
            _progress(f"inference {size} px x{batch} hflip={hflip}: "
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
        out.append(Row(setting, f"{s['median']:.2f} img/s{_range(s, '.2f')}", note))
    return out


# ----------------------------------------------------------------------------- threshold search

BINS = 256


def binned_beta(a: float, b: float) -> np.ndarray:
    """A Beta(a, b) density discretised on the 256 bins, (256,) float64 summing to 1."""
    x = (np.arange(BINS) + 0.5) / BINS
    p = x ** (a - 1) * (1 - x) ** (b - 1)
    return p / p.sum()


def random_oof_stats(n: int, side: int, seed: int = 0):
    """Plausible :class:`tfpneumo.evaluation.search.OofStats` of ``n`` images of ``side`` pixels
    without any probability map: multinomial histograms, 22 % positives, some false blobs."""
    from tfpneumo.evaluation.search import OofStats

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
                    hist_true=hist_true.astype(np.int32), pixels=np.full(n, pixels, np.int64))


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
    """``evaluate.search`` on ``images`` random OOF statistics pooled, and ``evaluate`` end to
    end over 5 fake fold folders (read oof.npz, pooled and per-fold searches, JSON, CSV,
    heatmap); medians of ``repeats`` after one untimed call."""
    from tfpneumo.config import Config
    from tfpneumo.evaluation.search import Grids, _area_grid, evaluate, parse_grid, search, snap

    repeats = repeats or (3 if ctx.quick else 5)
    stats = random_oof_stats(images, side)
    grids = Grids(bins=BINS, tops=snap(parse_grid(thresholds, "--thresholds"), BINS),
                  min_areas=_area_grid(min_areas, "--min-areas", side ** 2),
                  bottoms=snap(parse_grid(bottoms, "--bottoms"), BINS),
                  label_thresholds=parse_grid(label_thresholds, "--label-thresholds"))
    result = search(stats, grids)
    out: dict[str, Any] = {"images": images, "side": side,
                           "triplets": int(np.isfinite(result.triplet).sum()),
                           "label_rules": int(result.label.size), "plain_rules": int(result.plain.size),
                           "search_s": _timed(lambda: search(stats, grids), repeats)}
    _progress(f"threshold search: {out['search_s']['median']:.3f} s")
    if end_to_end:
        with tempfile.TemporaryDirectory(prefix="tfpneumo-bench-evaluate-") as tmp:
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
                return evaluate(Config(experiment="bench"), thresholds=thresholds,
                                min_areas=min_areas, bottoms=bottoms,
                                label_thresholds=label_thresholds, workdir=Path(tmp))

            run()
            out["evaluate_s"] = _timed(run, repeats)
    return out


def rows_threshold(result: dict) -> list[Row]:
    s = result["search_s"]
    met = "met" if s["median"] < THRESHOLD_TARGET_S else "NOT met"
    rows = [Row(f"search, {result['images']:,} images x {result['triplets']:,} triplets",
                f"{s['median']:.3f} s{_range(s, '.3f')}",
                f"+{result['label_rules']} label, {result['plain_rules']} plain rules; "
                f"target < {THRESHOLD_TARGET_S:.0f} s: {met}")]
    if "evaluate_s" in result:
        e = result["evaluate_s"]
        rows.append(Row("evaluate end to end, 5 folds", f"{e['median']:.2f} s{_range(e, '.2f')}",
                        "pooled + per-fold searches, JSON, CSV, heatmap"))
    return rows


# ----------------------------------------------------------------------------- tf.data service

# The albumentations transforms, each at a typical training probability.
HEAVY_AUGMENT = {"elastic_p": 0.5, "grid_distortion_p": 0.3, "optical_distortion_p": 0.3,
                 "clahe_p": 0.3}
SERVICE_TARGET_SCALING = 1.8  # 1 -> 2 worker processes


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_service(ctx: Context, *, size: int = 512, workers: Sequence[int] = (0, 1, 2),
                  images: int | None = None, batch: int = 8, warmup: int | None = None,
                  batches: int | None = None, repeats: int = 3) -> dict:
    """The training pipeline with the heavy (albumentations) transforms on, in this process
    (0) and through a local tf.data service of 1 and 2 worker processes (one core each).

    images/s read by this process after ``warmup`` batches (the workers' buffers fill): the
    median of ``repeats`` windows of ``batches`` batches; the CPU milliseconds per image of the
    workers and of this (reading) process, which shares the cores with them here. A cache of
    small shards: the service hands out record files, so each worker needs several.
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
        cache = Path(tmp) / "cache"
        build_synthetic_cache(cache, size, images, shard_size=8)
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
                pids = [w.pid for w in handles.workers] if handles else []
                w0 = sum(_process_cpu_s(pid) for pid in pids)
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
                       "worker_cpu_ms_per_img": (1e3 * (sum(_process_cpu_s(p) for p in pids) - w0)
                                                 / n_img if pids else None)}
                _progress(f"service, {n} worker(s): {row['img_per_s']['median']:.1f} img/s")
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
        out.append(Row(setting, f"{r['img_per_s']['median']:.1f} img/s{_range(r['img_per_s'], '.0f')}",
                       note))
    return out


# ----------------------------------------------------------------------------- registry

SECTIONS: dict[str, Section] = {
    "prepare": Section("prepare (real DICOMs)", bench_prepare, rows_prepare),
    "pipeline": Section("input pipeline", bench_pipeline, rows_pipeline),
    "service": Section("heavy augmentations via tf.data service", bench_service, rows_service),
    "train": Section("train step", bench_train, rows_train),
    "inference": Section("inference", bench_inference, rows_inference),
    "threshold": Section("threshold search", bench_threshold, rows_threshold),
}


def run_section(name: str, ctx: Context, params: dict | None = None) -> dict:
    """Runs one section in this process: ``{"status": "ok" | "skipped" | "error",
    "result" | "reason" | "error", "peak_rss_mb", "children_peak_rss_mb"}``."""
    with ChildrenPeak() as children:
        try:
            result = SECTIONS[name].run(ctx, **(params or {}))
            if "skipped" in result:
                out = {"status": "skipped", "reason": result["skipped"]}
            else:
                out = {"status": "ok", "result": result}
        except Exception as e:  # a failing section is a table row, the others still run
            out = {"status": "error", "error": error_line(e)}
    return {**out, **peak_rss(children.mb)}


# ----------------------------------------------------------------------------- summary and table

def starvation(sections: dict) -> list[dict]:
    """Input-pipeline rate / training-step rate at each image size both sections measured.

    The pipeline's best wall rate (over its settings) against the fastest train setting at
    that size. ``cpu_share``: the share of this machine's cores the pipeline needs to feed
    that train rate (train img/s / pipeline img per CPU-second / cores); both run on the
    same cores, so a ratio above 1 with a large share still slows training down.
    """
    pipe = [r for r in _ok_rows(sections, "pipeline") if r.get("img_per_cpu_s")]
    train = _ok_rows(sections, "train")
    n_cores = cores()
    out = []
    for size in sorted({r["size"] for r in pipe} & {r["size"] for r in train}):
        p = max((r for r in pipe if r["size"] == size), key=lambda r: r["img_per_s"]["median"])
        t = max((r for r in train if r["size"] == size), key=lambda r: r["img_per_s"]["median"])
        p_rate, t_rate = p["img_per_s"]["median"], t["img_per_s"]["median"]
        share = t_rate / p["img_per_cpu_s"] / n_cores
        out.append({"size": size, "pipeline_img_per_s": p_rate, "pipeline_npc": p["npc"],
                    "train_img_per_s": t_rate,
                    "train_setting": f"{t['size']}x{t['batch']} {t['precision']} "
                                     f"XLA {'on' if t['xla'] else 'off'}",
                    "ratio": p_rate / t_rate, "cpu_share": share,
                    "starved": p_rate < t_rate or share > 0.5})
    return out


def _ok_rows(sections: dict, name: str) -> list[dict]:
    entry = sections.get(name, {})
    if entry.get("status") != "ok":
        return []
    return [r for r in entry["result"].get("rows", []) if "error" not in r]


def rows_starvation(items: list[dict], sections: dict) -> list[Row]:
    if not items:
        have = [n for n in ("pipeline", "train") if _ok_rows(sections, n)]
        why = ("no image size measured by both" if len(have) == 2
               else "needs the pipeline and train sections")
        return [Row("pipeline / train step", "n/a", why)]
    return [Row(f"pipeline / train step at {s['size']} px",
                f"{s['ratio']:.1f}x",
                f"pipeline {s['pipeline_img_per_s']:.1f} img/s (npc {_npc(s['pipeline_npc'])}) vs "
                f"train {s['train_img_per_s']:.2f} img/s ({s['train_setting']}); feeding it takes "
                f"~{100 * s['cpu_share']:.1f}% of the cores: "
                f"{'INPUT-BOUND' if s['starved'] else 'not starved'}") for s in items]


def render_table(report: dict) -> str:
    """The one table of a report (as :func:`run_bench` returns it)."""
    m = report["machine"]
    load = m.get("load_avg_start")
    header = (f"tfpneumo bench ({'quick' if report['quick'] else 'full'}), {report['wall_s']:.0f} s | "
              f"{m['cpu']}, {m['cores']} cores (affinity; {m['cpu_count']} online), "
              f"avx512_bf16={m['avx512_bf16']} | TF {m['tensorflow']}, Keras {m['keras']} | "
              f"device {m.get('device') or 'n/a'}"
              + (f" | load {load[0]:.1f} at start, {m['load_avg_end'][0]:.1f} at end"
                 if load and m.get("load_avg_end") else ""))
    lines: list[tuple[str, str, str, str, str]] = []
    for name, entry in report["sections"].items():
        section = SECTIONS.get(name)
        label = f"{name} {entry.get('seconds', 0):.0f}s"
        rss = entry.get("peak_rss_mb")
        child = entry.get("children_peak_rss_mb") or 0.0
        rss_text = (f"{rss:.0f}" + (f" (+{child:.0f})" if child >= 1 and name != "train" else "")
                    if rss else "")
        if entry["status"] == "error":
            rows = [Row("", "failed", entry["error"])]
        elif entry["status"] == "skipped":
            rows = [Row("", "skipped", entry["reason"])]
        else:
            try:
                rows = section.rows(entry["result"]) if section else []
            except Exception as e:  # a bad result must not hide the rest of the table
                rows = [Row("", "failed", f"table: {error_line(e)}")]
        for i, row in enumerate(rows):
            own = f"{row.rss_mb:.0f}" if row.rss_mb else ""
            lines.append((label if i == 0 else "", row.setting, row.figure,
                          own or (rss_text if i == 0 else ""), row.note))
    compared = {"pipeline", "train"} <= set(report["sections"])
    for i, row in enumerate(rows_starvation(report.get("starvation", []), report["sections"])
                            if compared else []):
        lines.append(("starved?" if i == 0 else "", row.setting, row.figure, "", row.note))
    titles = ("section", "setting", "result", "peak MB", "notes")
    widths = [max(len(t), *(len(line[k]) for line in lines)) if lines else len(t)
              for k, t in enumerate(titles[:4])]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:2]) + "  " + "  ".join(
        f"{{:>{w}}}" for w in widths[2:]) + "  {}"
    out = [header, fmt.format(*titles), fmt.format(*("-" * w for w in widths), "-----")]
    out += [fmt.format(*line).rstrip() for line in lines]
    out.append("peak MB: peak resident memory of the section's process (+ its largest worker "
               "process); train: each setting's own process")
    return "\n".join(out)


def _machine_device(sections: dict) -> str | None:
    for entry in sections.values():
        device = entry.get("result", {}).get("device")
        if device:
            return device
    return None


def run_bench(out: Path | None, quick: bool, siim_mini: Path | None = None,
              sections: list[str] | None = None, *, params: dict[str, dict] | None = None,
              isolate: bool = True) -> dict:
    """Runs the benchmark sections, prints the table and returns (and writes) the report.

    Args:
        out: JSON file to write (None: do not write).
        quick: small settings (~2.5 min on 2 cores) instead of the full grid (~25-30 min).
        siim_mini: folder of real DICOMs for ``prepare`` (default: :func:`resolve_siim_mini`);
            when absent that section is reported as skipped.
        sections: names from :data:`SECTIONS` (default: all, in registry order).
        params: keyword arguments per section, e.g. ``{"pipeline": {"sizes": [512]}}``.
        isolate: each section in its own process (default; peak memory is then per section).

    Returns:
        ``{"machine", "quick", "wall_s", "sections": {name: {"status", "result" | "error" |
        "reason", "seconds", "peak_rss_mb", "children_peak_rss_mb", ...}}, "starvation",
        "table"}``; memory in MB (VmHWM of the section's process and of its largest child).
    """
    names = list(sections or SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise BenchError(f"unknown section(s) {', '.join(unknown)}; expected some of "
                         f"{', '.join(SECTIONS)}")
    params = params or {}
    bad = [n for n in params if n not in SECTIONS]
    if bad:
        raise BenchError(f"params for unknown section(s) {', '.join(bad)}")
    mini = resolve_siim_mini(siim_mini)
    ctx = Context(quick=quick, siim_mini=mini)
    start = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(), "quick": quick,
                              "siim_mini": str(mini), "sections": {}}
    for name in names:
        _progress(f"section {name} ...")
        t0 = time.perf_counter()
        if isolate:
            args = ["--section", name, "--siim-mini", str(mini), "--params",
                    json.dumps(params.get(name, {}))] + (["--quick"] if quick else [])
            entry = run_child(args, SECTION_TIMEOUT_S[quick])
        else:
            entry = run_section(name, ctx, params.get(name))
        entry["seconds"] = time.perf_counter() - t0
        report["sections"][name] = entry
        _progress(f"section {name}: {entry['status']} in {entry['seconds']:.0f} s")
    report["wall_s"] = time.perf_counter() - start
    report["machine"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["machine"]["device"] = _machine_device(report["sections"])
    report["starvation"] = starvation(report["sections"])
    report["table"] = render_table(report)
    print(report["table"], flush=True)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return report


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    global _progress_stream
    parser = argparse.ArgumentParser(prog="python -m tfpneumo.bench",
                                     description="One benchmark report of this machine.")
    parser.add_argument("--quick", action="store_true", help="small settings (~2.5 min on 2 cores)")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    parser.add_argument("--siim-mini", type=Path, default=None,
                        help="real DICOMs for prepare (default $TFPNEUMO_SIIM/siim-mini or "
                             "../shared/siim/siim-mini)")
    parser.add_argument("--sections", nargs="+", default=None, choices=list(SECTIONS))
    parser.add_argument("--params", default=None,
                        help='JSON keyword arguments per section, e.g. \'{"train": {"steps": 2}}\''
                             " (with --section: that section's arguments)")
    # internal: one section (or one train setting) in this process, result as JSON
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        params = json.loads(args.params) if args.params else {}
    except ValueError as e:
        parser.error(f"--params: not JSON ({e})")
    if args.section or args.case:
        _progress_stream = sys.stdout
        if args.case:
            result = {**train_case(**json.loads(args.case)), **peak_rss()}
        else:
            result = run_section(args.section, Context(args.quick, args.siim_mini), params)
        text = json.dumps(result, allow_nan=False)
        if args.json_out:
            args.json_out.write_text(text)
        else:
            print(text)
        sys.stdout.flush()
        sys.stderr.flush()
        # The result is out; skip interpreter teardown, which can hang on tf.data threads
        # still running Python ops (seen with the albumentations pipeline in this process).
        os._exit(0)
    try:
        run_bench(args.out, args.quick, args.siim_mini, args.sections, params=params)
    except TfpneumoError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
