"""Does a recipe learn on data it was not tuned on? Looks x seeds, tfpneumo beside its PyTorch twin.

For each ``tfpneumo synth`` look: one dataset (SIIM layout, 256 px DICOMs), one cache at the
recipe's size (``tfpneumo prepare``'s code), then for each seed a fold-0 training of the
recipe in its shipped budget and ``evaluate`` on its out-of-fold predictions. With ``--twin``
the PyTorch twin (scripts/twin_torch.py, needs ``pip install -e ".[twin]"``) trains on the
same DICOMs, folds and budget with the same seed. Prints a markdown table (best rule against
all-empty, per run) and writes every figure to ``OUT/learning_check.json``.

    python scripts/learning_check.py --looks standard,faint,noisy --seeds 0,1,2 --out lc --twin

Columns: ``tfpneumo best`` is evaluate's best rule (triplet, label or plain) on the network
``--weights auto`` picks (SWA in the demo); ``triplet`` is its best triplet alone, the rule
the twin searches; the twin's ``swa`` is its SWA network's best triplet (the model tfpneumo
scores), ``best ep`` its best epoch's. A run "collapsed" when its mask output is empty on
every validation image at 0.5 while positives exist.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
N_TRAIN, N_TEST, DICOM_SIZE, DATA_SEED = 200, 4, 256, 7


def make_data(look: str, root: Path, cfg, n_train: int,
              masks_from: Path | None = None) -> tuple[Path, Path]:
    from tfpneumo.config import replace
    from tfpneumo.data.prepare import prepare_cache
    from tfpneumo.data.synth import synthesize

    data, cache = root / "data", root / "cache"
    if not (data / "train-rle.csv").exists():
        kwargs = {} if look == "standard" else {"look": look}
        if masks_from is not None:
            kwargs["masks_from"] = masks_from
        synthesize(data, n_train=n_train, n_test=N_TEST, size=DICOM_SIZE, seed=DATA_SEED, **kwargs)
    prepare_cache(data, cache, replace(cfg, prepare={"size": cfg.data.image_size}), progress=False)
    return data, cache


def run_tfpneumo(cfg, workdir: Path) -> dict:
    import keras
    import numpy as np

    import tfpneumo

    t0 = time.time()
    tfpneumo.train(cfg, [0], workdir)
    summary = tfpneumo.evaluate(cfg, folds=[0], workdir=workdir).summary
    fold = workdir / "runs" / cfg.experiment / "fold_0"
    result = json.loads((fold / "result.json").read_text())
    with np.load(fold / "oof.npz") as oof:
        truth_positive = oof["hist_true"].sum(axis=1) > 0
        # pixels at >= 0.5: bins 128..255 of the probability histogram
        mask_positive = oof["hist_all"][:, oof["hist_all"].shape[1] // 2:].sum(axis=1) > 0
    keras.backend.clear_session()
    return {"best": summary["best"]["score"], "best_rule": summary["best"]["rule"],
            "triplet": summary["pooled"]["triplet"]["score"], "empty": summary["empty_score"],
            "learned": result["learned"], "model": result["oof_model"],
            "collapsed": bool(truth_positive.any() and not mask_positive.any()),
            "seconds": round(time.time() - t0, 1)}


def run_twin(cfg, data: Path, cache: Path, seed: int, out: Path) -> dict:
    args = [sys.executable, str(SCRIPTS / "twin_torch.py"), "--data", str(data),
            "--index", str(cache / "index.csv"), "--fold", "0", "--size", str(cfg.data.image_size),
            "--encoder", cfg.model.encoder,
            "--decoder", ",".join(str(f) for f in cfg.model.decoder_filters),
            "--epochs", str(cfg.train.epochs), "--steps", str(cfg.train.steps_per_epoch),
            "--batch", str(cfg.data.batch_size), "--lr", str(cfg.optimizer.lr),
            "--warmup", str(cfg.optimizer.warmup_epochs),
            "--swa-epochs", str(cfg.train.swa_epochs), "--swa-bn-steps", str(cfg.train.swa_bn_steps),
            "--mask-prior", str(cfg.model.mask_prior), "--seed", str(seed), "--out", str(out)]
    t0 = time.time()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    report = json.loads(out.read_text())
    swa = report.get("swa") or {}
    return {"swa": (swa.get("best_triplet") or {}).get("score"),
            "best_epoch": report["best_triplet"]["score"], "empty": report["all_empty"],
            "seconds": round(time.time() - t0, 1)}


def _mean(values: list) -> str:
    values = [v for v in values if isinstance(v, (int, float))]
    return f"{statistics.mean(values):.3f}" if values else "-"


def table(rows: list[dict], twin: bool) -> str:
    head = "| look | seed | all-empty | tfpneumo best | triplet | learned | collapsed |"
    rule = "|---|---|---|---|---|---|---|"
    if twin:
        head += " twin swa | twin best ep |"
        rule += "---|---|"
    lines = [head, rule]
    for r in rows:
        t = r["tfpneumo"]
        line = (f"| {r['look']} | {r['seed']} | {t['empty']:.3f} | {t['best']:.3f} ({t['best_rule']}) "
                f"| {t['triplet']:.3f} | {'yes' if t['learned'] else 'NO'} | "
                f"{'YES' if t['collapsed'] else 'no'} |")
        if twin:
            w = r.get("twin", {})
            line += (f" {w['swa']:.3f} | {w['best_epoch']:.3f} |" if "swa" in w and w["swa"] is not None
                     else f" {w.get('error', '-')} | |")
        lines.append(line)
    looks = sorted({r["look"] for r in rows}, key=[r["look"] for r in rows].index)
    for look in looks:
        mine = [r for r in rows if r["look"] == look]
        line = (f"| {look} | mean | {_mean([r['tfpneumo']['empty'] for r in mine])} | "
                f"{_mean([r['tfpneumo']['best'] for r in mine])} | "
                f"{_mean([r['tfpneumo']['triplet'] for r in mine])} | | |")
        if twin:
            line += (f" {_mean([r.get('twin', {}).get('swa') for r in mine])} | "
                     f"{_mean([r.get('twin', {}).get('best_epoch') for r in mine])} |")
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--looks", default="standard", help="comma-separated synth looks")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--config", default="demo", help="recipe: a config name or YAML path")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override key=value (repeatable)")
    ap.add_argument("--n-train", type=int, default=N_TRAIN)
    ap.add_argument("--masks-from", type=Path, default=None,
                    help="SIIM label CSV: real pneumothorax shapes instead of procedural ones")
    ap.add_argument("--twin", action="store_true", help="also train the PyTorch twin")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from tfpneumo.config import find_config, load_config

    rows = []
    for look in args.looks.split(","):
        root = (args.out / look).resolve()
        base = load_config(find_config(args.config), [*args.overrides, f"data.cache={root / 'cache'}",
                                                       "train.tensorboard_images=0"])
        data, cache = make_data(look, root, base, args.n_train, args.masks_from)
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = load_config(find_config(args.config), [
                *args.overrides, f"data.cache={cache}", "train.tensorboard_images=0",
                f"seed={seed}", f"experiment={base.experiment}-{look}-s{seed}"])
            row = {"look": look, "seed": seed, "tfpneumo": run_tfpneumo(cfg, root)}
            if args.twin:
                row["twin"] = run_twin(cfg, data, cache, seed, root / f"twin-s{seed}.json")
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "learning_check.json").write_text(json.dumps(rows, indent=1))
    print(table(rows, args.twin))


if __name__ == "__main__":
    main()
