"""Training speed (images/s) of the real network: the ``train`` section of ``tfpneumo.bench``.

A wrapper with this script's old options; the logic (each setting in its own process, compile
time, median of timed windows, images per CPU-second) is in
:func:`tfpneumo.bench.train.train_case`.

    python scripts/bench_train.py --quick    # 256 px, batch 4, float32/bf16, XLA off
    python scripts/bench_train.py --out bench_train.json  # 256x4 256x8 512x4, XLA off/on
    python scripts/bench_train.py --cases 256x4 --precisions float32 --xla off --seconds 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tfpneumo.bench import run_bench


def parse_case(text: str) -> list[int]:
    """``"256x4"`` -> ``[256, 4]`` (size x batch)."""
    try:
        size, batch = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIZExBATCH, e.g. 256x4") from None
    if size % 32 or size <= 0 or batch <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: size must be a multiple of 32, batch > 0")
    return [size, batch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256x4, float32 and mixed, XLA off")
    parser.add_argument("--cases", type=parse_case, nargs="+", default=None,
                        help="SIZExBATCH settings (default 256x4 256x8 512x4)")
    parser.add_argument("--precisions", nargs="+", default=None,
                        choices=("float32", "mixed", "mixed_bfloat16", "mixed_float16"),
                        help="mixed = mixed_float16 on a GPU, mixed_bfloat16 on a CPU")
    parser.add_argument("--xla", nargs="+", choices=("off", "on"), default=None)
    parser.add_argument("--seconds", type=float, default=None,
                        help="approximate length of a timed window (quick 3, else 10)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per timed window (overrides --seconds)")
    parser.add_argument("--windows", type=int, default=None, help="timed windows (quick 3, else 5)")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    args = parser.parse_args()
    params = {"cases": args.cases, "precisions": args.precisions, "seconds": args.seconds,
              "windows": args.windows, "steps": args.steps,
              "xla": None if args.xla is None else [x == "on" for x in args.xla]}
    run_bench(args.out, args.quick, sections=["train"], params={"train": params})


if __name__ == "__main__":
    main()
