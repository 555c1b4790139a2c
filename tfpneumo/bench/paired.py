"""Ours and the peer's train step timed in alternating windows: the ratio of one run.

The two train steps run in two processes that stay alive; the parent asks each in turn for a
window of steps, ours, peer, peer, ours, ... (an ABBA order: a drift of the machine's speed
over the minutes of a run, which on this project's shared 2-core machine moves a figure by
15-25 % between one process and the next, falls on both alike). Each round's ratio is ours /
the peer's images/s of its two windows, and the report gives the median over the rounds.

Worker protocol (``python -m tfpneumo.bench --paired ours|peer --case JSON``): after its
warm-up steps the worker prints ``ready <steps per window>``; each ``run`` line on its stdin
makes it run that many steps and print ``<wall s> <cpu s>``; end of input ends it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from tfpneumo.bench.harness import error_line, rate, spread

SIDES = ("ours", "peer")


def _serve(step, seconds: float) -> None:
    """Warm-up (two steps: the trace, then one that sizes the window), then windows on request."""
    step()
    t0 = time.perf_counter()
    step()
    n = max(1, round(seconds / (time.perf_counter() - t0)))
    print(f"ready {n}", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            step()
        print(f"{time.perf_counter() - t0} {time.process_time() - c0}", flush=True)


def ours_step(size: int, batch: int, seed: int = 0):
    """One optimizer step of our training loop (:mod:`tfpneumo.training.loop`'s compiled step
    under the default strategy) in the PyTorch reference's layout, float32, on one in-memory
    batch repeated: what the train section's ``reference`` row times."""
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    from tfpneumo.bench.synthetic import random_batch
    from tfpneumo.bench.train import bench_trainer
    from tfpneumo.training import loop

    trainer = bench_trainer(size, batch, "float32", False, "reference", seed)
    data = random_batch(size, batch, seed)
    batches = iter(tf.data.Dataset.from_tensors(data).repeat())
    train_one = loop._train_function(trainer, tf.distribute.get_strategy(), False,
                                     tf.Variable(0.0, trainable=False))

    def step() -> None:
        logs, _ = train_one(batches)
        float(logs["loss"])  # the loop reads the logs after every step too

    return step


def serve(side: str, spec: dict) -> None:
    """The worker: ``side`` ours or peer, ``spec`` size, batch, seconds (and fmt for the peer)."""
    if side == "ours":
        step = ours_step(spec["size"], spec["batch"])
    else:  # the peer section's own step
        from tfpneumo.bench.peer import peer_train_step

        step = peer_train_step(spec["size"], spec["batch"], spec["fmt"])
    _serve(step, spec["seconds"])


class _Worker:
    def __init__(self, side: str, spec: dict, timeout: float):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "SM_FRAMEWORK": "tf.keras"}
        self.side, self.timeout = side, timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tfpneumo.bench", "--paired", side, "--case", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env, start_new_session=True)
        self.steps = int(self._line().split()[1])

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            tail = [x for x in self.proc.stderr.read().splitlines() if x.strip()]
            raise RuntimeError(f"{self.side} worker exited: {tail[-1] if tail else 'no output'}")
        return line

    def window(self) -> tuple[float, float]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        wall, cpu = self._line().split()
        return float(wall), float(cpu)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def head_to_head(size: int, batch: int, fmt: str, *, rounds: int, seconds: float,
                 timeout: float = 600) -> dict:
    """Ours (reference layout, float32) and the peer (``fmt``) in alternating windows:
    per side the images/s of each window, per round the ratio ours / peer, their medians."""
    spec = {"size": size, "batch": batch, "seconds": seconds, "fmt": fmt}
    workers: dict[str, _Worker] = {}
    try:
        for side in SIDES:  # one at a time: the warm-up of one must not slow the other's
            workers[side] = _Worker(side, spec, timeout)
        rates: dict[str, list[float]] = {s: [] for s in SIDES}
        cpus: dict[str, list[float]] = {s: [] for s in SIDES}
        for r in range(rounds):
            for side in (SIDES if r % 2 == 0 else SIDES[::-1]):  # ABBA
                wall, cpu = workers[side].window()
                rates[side].append(workers[side].steps * batch / wall)
                cpus[side].append(cpu)
        ratios = [o / p for o, p in zip(rates["ours"], rates["peer"], strict=True)]
        return {"size": size, "batch": batch, "peer_format": fmt, "rounds": rounds,
                "steps": {s: workers[s].steps for s in SIDES},
                "img_per_s": {s: spread(rates[s]) for s in SIDES},
                "img_per_cpu_s": {s: rate(workers[s].steps * batch, statistics.median(cpus[s]))
                                  for s in SIDES},
                "ratios": ratios, "ratio": statistics.median(ratios)}
    except Exception as e:  # a side that does not run here is a result, not a crash
        return {"size": size, "batch": batch, "peer_format": fmt, "error": error_line(e)}
    finally:
        for w in workers.values():
            w.close()
