"""``tfpneumo train --fold all --parallel N``: folds side by side, one process per fold.

Each fold is an ordinary ``tfpneumo train --fold k`` process (resumable, locked, its own run
folder), at most N at once; the GPUs of the machine are split between the N slots
(``CUDA_VISIBLE_DEVICES``), and on CPU each process gets its share of the cores. This process
only starts them, shows one progress line (each fold's completed epochs, from its run state)
and prints one summary. Each fold's output goes to ``runs/<experiment>/logs/fold_<k>.log``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tfpneumo import runs
from tfpneumo.config import Config, dump_config
from tfpneumo.errors import TfpneumoError

POLL_S = 1.0  # how often the progress line is refreshed


@dataclass
class FoldProcess:
    fold: int
    log: Path
    process: subprocess.Popen | None = None
    started: float = 0.0
    ended: float = 0.0
    extra_env: dict[str, str] = field(default_factory=dict)


def slot_environments(n: int, gpus: list[str], cores: int) -> list[dict[str, str]]:
    """Per slot: its GPUs (``CUDA_VISIBLE_DEVICES``, GPUs dealt round-robin; with fewer GPUs
    than slots, slots share them) or, without GPUs, its share of the cores for TensorFlow's
    thread pools (N processes with a pool of every core each would oversubscribe)."""
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i::n]) or gpus[i % len(gpus)]}
                for i in range(n)]
    threads = str(max(1, cores // n))
    return [{"TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": threads}
            for _ in range(n)]


def fold_command(config_file: Path, fold: int) -> list[str]:
    return [sys.executable, "-m", "tfpneumo.cli", "train", "--config", str(config_file),
            "--fold", str(fold)]


def _completed_epochs(run_dir: Path) -> int:
    """The fold's completed epochs from its run state (0 before the first; any stage)."""
    best = 0
    for state in run_dir.glob(f"**/{runs.STATE}/state.json"):
        try:
            best = max(best, int(json.loads(state.read_text())["completed_epochs"]))
        except (OSError, ValueError, KeyError):
            continue  # being replaced right now: the next poll reads it
    return best


def train_parallel(cfg: Config, folds: list[int], parallel: int, workdir: Path = Path("."),
                   command=fold_command) -> str:
    """Trains ``folds`` in at most ``parallel`` processes at once; returns the summary.

    When folds fail, prints the summary and raises TfpneumoError naming them, after every
    other fold has finished.
    """
    if parallel < 1:
        raise TfpneumoError(f"--parallel {parallel}: must be >= 1")
    experiment_dir = runs.fold_dir(cfg.experiment, 0, workdir).parent
    logs = experiment_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # The children read the resolved config (file and --set values) from one file.
    config_file = logs / "config.yaml"
    dump_config(cfg, config_file)
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if not gpus and "CUDA_VISIBLE_DEVICES" not in os.environ:
        import tensorflow as tf

        gpus = [str(i) for i in range(len(tf.config.list_physical_devices("GPU")))]
    slots = slot_environments(parallel, gpus, os.cpu_count() or 1)
    waiting = [FoldProcess(k, logs / f"fold_{k}.log") for k in folds]
    running: dict[int, FoldProcess] = {}  # slot -> process
    done: list[FoldProcess] = []
    epochs = cfg.train.epochs * len(cfg.stage_configs())
    tty = sys.stderr.isatty()
    try:
        while waiting or running:
            for slot in range(parallel):
                if slot not in running and waiting:
                    job = waiting.pop(0)
                    job.extra_env = slots[slot]
                    with open(job.log, "w") as log:
                        job.process = subprocess.Popen(
                            command(config_file, job.fold), cwd=workdir, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, **job.extra_env})
                    job.started = time.time()
                    running[slot] = job
            for slot, job in list(running.items()):
                if job.process.poll() is not None:
                    job.ended = time.time()
                    done.append(running.pop(slot))
            states = [(j.fold, _completed_epochs(runs.fold_dir(cfg.experiment, j.fold, workdir)))
                      for j in running.values()]
            line = " | ".join([f"fold {k}: epoch {e}/{epochs}" for k, e in states]
                              + [f"{len(waiting)} waiting"] * bool(waiting))
            if tty and line:
                sys.stderr.write("\r" + line + "\033[K")
                sys.stderr.flush()
            if running:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        for job in running.values():
            job.process.terminate()  # each saves its state (SIGTERM), a rerun resumes
        for job in running.values():
            job.process.wait()
        raise
    if tty:
        sys.stderr.write("\n")
    return _summary(cfg, done, workdir)


def _summary(cfg: Config, done: list[FoldProcess], workdir: Path) -> str:
    lines, failed = [], []
    for job in sorted(done, key=lambda j: j.fold):
        result = runs.fold_dir(cfg.experiment, job.fold, workdir) / runs.RESULT
        minutes = (job.ended - job.started) / 60
        if job.process.returncode == 0 and result.exists():
            r = json.loads(result.read_text())
            lines.append(f"fold {job.fold}: best val Dice {r['best_val_dice']:.4f}, out-of-fold "
                         f"{r.get('best_oof_dice', float('nan')):.4f} (all-empty "
                         f"{r['empty_baseline']:.4f}), {minutes:.1f} min -> {r['run_dir']}")
            if r.get("learning_note"):
                lines.append(f"warning: fold {job.fold} {r['learning_note']}")
        else:
            tail = [x for x in job.log.read_text(errors="replace").splitlines() if x.strip()]
            failed.append(job.fold)
            lines.append(f"fold {job.fold}: failed (exit {job.process.returncode}): "
                         f"{tail[-1] if tail else 'no output'} (log: {job.log})")
    summary = "\n".join(lines)
    if failed:
        print(summary)
        raise TfpneumoError(f"fold(s) {', '.join(map(str, failed))} failed (above; their logs "
                            "say why); rerun the same command to resume them")
    return summary
