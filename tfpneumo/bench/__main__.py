"""``python -m tfpneumo.bench``: the whole report, or (internal) one section or one train
setting in this process with its result as JSON, which is how the report runs each of them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tfpneumo.bench.harness import SECTIONS, Context, peak_rss, progress_to, run_section
from tfpneumo.bench.report import run_bench
from tfpneumo.errors import TfpneumoError


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument("--paired", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        params = json.loads(args.params) if args.params else {}
    except ValueError as e:
        parser.error(f"--params: not JSON ({e})")
    if args.paired:  # a worker of tfpneumo.bench.paired: windows on request over stdin/stdout
        from tfpneumo.bench.paired import serve

        serve(args.paired, json.loads(args.case))
        sys.stdout.flush()
        os._exit(0)
    if args.section or args.case:
        progress_to(sys.stdout)
        if args.case:
            from tfpneumo.bench.train import train_case

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
