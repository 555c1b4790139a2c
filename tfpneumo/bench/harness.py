"""How a benchmark section runs: its context, its table rows, its own process, its memory.

Sections, each run in its own fresh Python process (``python -m tfpneumo.bench --section
NAME``), so its peak resident memory is its own and no TensorFlow state carries over:

* ``prepare``: real 1024 JPEG-Baseline DICOMs (siim-mini) to a 512 cache with
  :func:`tfpneumo.data.prepare.prepare_cache`, 1 worker and all cores.
* ``pipeline``: :func:`tfpneumo.data.pipeline.train_dataset` with the default augmentations on
  a cache that ``tfpneumo prepare``'s code makes of ``tfpneumo synth`` DICOMs, per
  ``num_parallel_calls``; target >= 60 img/s per core at 512.
* ``service``: the same pipeline with the heavy (albumentations) transforms, in the reading
  process and through a local tf.data service of 1 and 2 worker processes.
* ``train``: the train step of :class:`tfpneumo.training.trainer.Trainer` (each setting in its own
  process): precision, XLA, batch size, against the PyTorch reference.
* ``inference``: :func:`tfpneumo.inference.ensemble_predictor` as ``tfpneumo submit`` uses it,
  at 1024 with horizontal-flip TTA, and at 256 px batch 4 (the training parity setting); then
  a 2-fold ensemble at 1024 with flip TTA through the path before issue 13 (two forwards per
  fold) and submit's (one), in interleaved rounds (the full run adds bfloat16 and XLA).
* ``peer``: segmentation_models.pytorch's ``Unet("resnet34")`` trained and run at the train
  and inference sections' settings (the ``peer`` extra; skipped without it).
* ``limit``: the float32 / bfloat16 matmul peak and the network's FLOPs per image (TF's cost
  analysis), which turn the train and inference rates into shares of the peak.
* ``threshold``: the rule search of ``tfpneumo evaluate``, 12,000 images x >= 1,000 triplets.

Then the ratio of the input-pipeline rate to the training-step rate at the same image size
says whether the network would wait for its input on this machine
(:func:`tfpneumo.bench.report.starvation`); ours / the peer's rate at the same setting
(:func:`tfpneumo.bench.report.peer_comparison`); the FLOP/s reached as a share of the peak
(:func:`tfpneumo.bench.report.limit_shares`).

Adding a section: a module ``tfpneumo/bench/<name>.py`` with ``bench_<name>(ctx, **params) ->
dict`` (runs in the child process; JSON-able; return ``{"skipped": reason}`` to skip) and
``rows_<name>(result) -> list[Row]`` for the table, and one :data:`SECTIONS` entry in
``tfpneumo/bench/__init__.py``. Sections import this module, never each other's internals
(shared generated data: :mod:`tfpneumo.bench.synthetic`).
"""

from __future__ import annotations

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
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tfpneumo.errors import TfpneumoError
from tfpneumo.machine import cpu_info

SECTION_TIMEOUT_S = {True: 900.0, False: 4 * 3600.0}  # per section process, by quick

# Settings shared by our sections and the peer's, by quick: train (size, batch); inference
# (size, batch, hflip, batches_per_window, windows).
TRAIN_CASES = {True: ((256, 4),), False: ((256, 4), (256, 8), (512, 4))}
INFERENCE_CASES = {True: ((1024, 2, True, 1, 2), (256, 4, False, 2, 3)),
                   False: ((1024, 2, True, 2, 3), (1024, 2, False, 2, 3), (256, 4, False, 5, 3),
                           (256, 4, True, 5, 3))}


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


# The sections in table order. Filled by tfpneumo/bench/__init__.py: the section modules
# import this one, so it cannot import them.
SECTIONS: dict[str, Section] = {}


# ----------------------------------------------------------------------------- measuring

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


def span(s: dict, fmt: str) -> str:
    """`` [min-max]`` of a repeated measurement (a :func:`spread`), empty for a single one."""
    return f" [{s['min']:{fmt}}-{s['max']:{fmt}}]" if s.get("n", 1) > 1 else ""


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


# Progress lines: stderr in the top process (its stdout is the table); a child's stdout, which
# its parent points at its own progress stream (see run_child).
_progress_stream: TextIO = sys.stderr


def progress(text: str) -> None:
    print(f"[bench] {text}", file=_progress_stream, flush=True)


def progress_to(stream: TextIO) -> None:
    """Sends :func:`progress` lines to ``stream`` (a section's process: its stdout)."""
    global _progress_stream
    _progress_stream = stream


# ----------------------------------------------------------------------------- memory and CPU

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


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- the machine

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
    model, flags = cpu_info()
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


# ----------------------------------------------------------------------------- running

def run_child(args: list[str], timeout: float) -> dict:
    """``python -m tfpneumo.bench ARGS --json-out FILE`` in a fresh process; its JSON.

    The child's stdout (progress lines) goes to our progress stream, its stderr (TensorFlow's
    chatter) to a file whose last line becomes the error when the child dies without a result.
    On a timeout or Ctrl-C the child's whole process group (its workers too) is killed.
    """
    with tempfile.TemporaryDirectory(prefix="tfpneumo-bench-") as tmp:
        out, err = Path(tmp) / "result.json", Path(tmp) / "stderr.txt"
        cmd = [sys.executable, "-m", "tfpneumo.bench", *args, "--json-out", str(out)]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "SM_FRAMEWORK": "tf.keras"}
        try:
            stdout = _progress_stream.fileno()
        except (AttributeError, OSError, ValueError):  # captured stream (pytest): inherit
            stdout = None
        with open(err, "w") as f_err:
            proc = subprocess.Popen(cmd, stdout=stdout, stderr=f_err, env=env,
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
