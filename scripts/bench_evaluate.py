"""Speed of the out-of-fold rule search: the ``threshold`` section of ``tfpneumo.bench``.

A wrapper with this script's old options; the logic is in
:func:`tfpneumo.bench.threshold.bench_threshold` (random OOF statistics, ``search`` pooled and
``evaluate`` end to end over 5 fake folds).
Target: the full search under 5 s for 12,000 images x 1,000 triplets.

    python scripts/bench_evaluate.py
    python scripts/bench_evaluate.py --images 12000 --thresholds 0.3:0.8:0.025 --repeats 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tfpneumo.bench import run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12_000)
    parser.add_argument("--side", type=int, default=512, help="cached image side")
    parser.add_argument("--thresholds", default="0.3:0.8:0.025")
    parser.add_argument("--min-areas", default="auto")
    parser.add_argument("--bottoms", default="0.2:0.5:0.05")
    parser.add_argument("--label-thresholds", default="0.3:0.8:0.05")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    args = parser.parse_args()
    params = {"images": args.images, "side": args.side, "thresholds": args.thresholds,
              "min_areas": args.min_areas, "bottoms": args.bottoms,
              "label_thresholds": args.label_thresholds, "repeats": args.repeats}
    run_bench(args.out, quick=False, sections=["threshold"], params={"threshold": params})


if __name__ == "__main__":
    main()
