"""Benchmark the RLE codecs: decode and re-encode every row of the stage-2 label file.

Usage::

    python scripts/bench_rle.py [--csv ../shared/siim/stage_2_train.csv.gz] [--repeats 3]

Prints the median wall and CPU time over the repeats and the rows per second (one core: the
codecs are single-threaded numpy). Every row must re-encode to its own string; the script
fails loudly otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd

from tfpneumo.data.rle import decode, encode

DEFAULT_CSV = Path(__file__).resolve().parent.parent.parent / "shared/siim/stage_2_train.csv.gz"


def load_rows(csv: Path) -> list[str]:
    """All EncodedPixels values of a label CSV, stripped (header has a leading space)."""
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    frame.columns = [c.strip() for c in frame.columns]
    return [v.strip() for v in frame["EncodedPixels"]]


def run_once(rows: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds to decode and re-encode ``rows``; checks every row round-trips."""
    wall, cpu = time.perf_counter(), time.process_time()
    for rle in rows:
        again = encode(decode(rle, (1024, 1024)))
        if again != rle:
            raise SystemExit(f"round trip changed a row: {rle[:60]!r} -> {again[:60]!r}")
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = load_rows(args.csv)
    n_pos = sum(r != "-1" for r in rows)
    runs = [run_once(rows) for _ in range(args.repeats)]
    walls = [w for w, _ in runs]
    median = statistics.median(walls)
    cpu = statistics.median(c for _, c in runs)
    print(f"{len(rows)} rows ({n_pos} positive) from {args.csv.name}")
    print(f"decode + encode: {median:.2f} s wall, median of {args.repeats} "
          f"({', '.join(f'{t:.2f}' for t in walls)}); {cpu:.2f} s CPU; "
          f"{len(rows) / median:.0f} rows/s")


if __name__ == "__main__":
    main()
