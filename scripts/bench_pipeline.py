"""Throughput of the training input pipeline: the ``pipeline`` section of ``tfpneumo.bench``.

A wrapper with this script's old options; the logic is in
:func:`tfpneumo.bench.pipeline.bench_pipeline` (on a cache that ``tfpneumo prepare``'s code makes
of synthetic DICOMs).

    python scripts/bench_pipeline.py                    # 256, 512 and 1024, 200 images each
    python scripts/bench_pipeline.py --sizes 512 --images 100 --batches 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tfpneumo.bench import run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=25, help="batches per timed run")
    parser.add_argument("--in-memory", default="always", choices=["always", "never"])
    parser.add_argument("--per-element", action="store_true",
                        help="augment single images instead of whole batches")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    args = parser.parse_args()
    params = {"sizes": args.sizes, "images": args.images, "batch": args.batch,
              "batches": args.batches, "in_memory": args.in_memory, "vectorize": not args.per_element}
    run_bench(args.out, quick=False, sections=["pipeline"], params={"pipeline": params})


if __name__ == "__main__":
    main()
