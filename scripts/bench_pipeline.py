"""Throughput of the training input pipeline (images/s), per core.

Builds synthetic caches (random uint8 images, rectangle masks) in a temporary folder and times
``tfpneumo.data.pipeline.train_dataset`` with the default (non-heavy) augmentations, for
several ``num_parallel_calls`` and tf.data thread-pool sizes. Prints the median of 3 timed runs
after a warm-up. Target: >= 60 img/s per CPU core at 512.

    python scripts/bench_pipeline.py                    # 512 and 1024, 200 images each
    python scripts/bench_pipeline.py --sizes 512 --images 100 --batches 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tfpneumo.tfimport import quiet_tensorflow

tf = quiet_tensorflow()

from tfpneumo.config import load_config, replace  # noqa: E402
from tfpneumo.data import pipeline, records  # noqa: E402


def build_cache(folder: Path, size: int, n_images: int, folds: int = 2, shard_size: int = 50,
                seed: int = 0) -> None:
    """``n_images`` random images (25% positive) split into ``folds`` folds and shards."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[int, bool], list[int]] = {}
    for i in range(n_images):
        groups.setdefault((i % folds, i % 4 == 0), []).append(i)
    for (fold, positive), items in sorted(groups.items()):
        for k in range(0, len(items), shard_size):
            chunk = items[k:k + shard_size]
            shard = folder / records.train_shard_name(fold, positive, k // shard_size)
            ids = []
            with tf.io.TFRecordWriter(str(shard)) as writer:
                for i in chunk:
                    # Smooth-ish content (not pure noise) so PNG/bilinear costs are realistic.
                    base = rng.integers(0, 256, (size // 8, size // 8), dtype=np.uint8)
                    image = np.kron(base, np.ones((8, 8), np.uint8))
                    image = (image + rng.integers(0, 16, image.shape, dtype=np.uint8))
                    mask = np.zeros((size, size), np.uint8)
                    if positive:
                        y, x = rng.integers(0, size // 2, 2)
                        mask[y:y + size // 4, x:x + size // 6] = 1
                    image_id = f"img{i:05d}"
                    writer.write(records.serialize_example(image_id, image, mask,
                                                           int(positive), fold, int(positive)))
                    ids.append(image_id)
            records.sidecar_path(shard).write_text(json.dumps({"ids": ids, "skipped": []}))


def time_pipeline(cache: Path, image_size: int, npc: int, threads: int, batch: int,
                  batches: int, vectorize: bool, in_memory: str) -> tuple[float, float]:
    """Median images/s and images per CPU-second (process CPU time, all threads) over 3 runs
    of ``batches`` batches, after one warm-up run. The CPU figure does not depend on what
    else runs on the machine."""
    cfg = load_config(None)
    cfg = replace(cfg, data={"image_size": image_size, "batch_size": batch,
                             "num_parallel_calls": npc, "cache_in_memory": in_memory,
                             "shuffle_buffer": 64})
    ds, _ = pipeline.train_dataset(cache, -1, cfg, epochs=10, seed=0, vectorize=vectorize)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(options)
    it = iter(ds)
    for _ in range(batches):  # warm-up: fills the in-memory cache, autotuner settles
        next(it)
    rates, per_cpu = [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(it)
        rates.append(batches * batch / (time.perf_counter() - t0))
        per_cpu.append(batches * batch / (time.process_time() - c0))
    return statistics.median(rates), statistics.median(per_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=25, help="batches per timed run")
    parser.add_argument("--in-memory", default="always", choices=["always", "never"])
    parser.add_argument("--per-element", action="store_true",
                        help="augment single images instead of whole batches")
    args = parser.parse_args()

    # (num_parallel_calls, tf.data threads): one core, two cores with 2 calls, AUTOTUNE.
    settings = [(1, 1), (2, 2), (-1, 1), (-1, 2)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            cache = Path(tmp) / f"cache{size}"
            build_cache(cache, size, args.images)
            for npc, threads in settings:
                rate, per_cpu = time_pipeline(cache, size, npc, threads, args.batch,
                                              args.batches, not args.per_element, args.in_memory)
                rows.append((size, "AUTOTUNE" if npc == -1 else str(npc), threads, rate, per_cpu))
                print(f"  size={size} npc={rows[-1][1]} threads={threads}: {rate:.1f} img/s, "
                      f"{per_cpu:.1f} img per CPU-s", flush=True)
    mode = "per-element" if args.per_element else "batched"
    print(f"\ntrain pipeline, default augmentations, {mode}, in-memory cache={args.in_memory}, "
          f"batch {args.batch}, median of 3 x {args.batches} batches")
    print(f"{'size':>5} {'num_parallel_calls':>18} {'threads':>7} {'img/s':>8} "
          f"{'img/s/thread':>12} {'img/CPU-s':>10}")
    for size, npc_name, threads, rate, per_cpu in rows:
        print(f"{size:>5} {npc_name:>18} {threads:>7} {rate:>8.1f} {rate / threads:>12.1f} "
              f"{per_cpu:>10.1f}")


if __name__ == "__main__":
    main()
