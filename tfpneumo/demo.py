"""``tfpneumo demo``: the whole pipeline on generated data, in a few minutes on a laptop CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tfpneumo.config import find_config, load_config

# Synthetic DICOMs at 256 px, cached and trained at 128 px (configs/demo.yaml): small enough
# for 2 CPU cores, large enough for the pathology to stay visible.
N_TRAIN, N_TEST, DICOM_SIZE, CACHE_SIZE, SEED = 160, 8, 256, 128, 1


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.time()


def run_demo(workdir: Path) -> dict:
    """Runs every command in ``workdir`` and prints where each artefact is. Returns the paths.

    Each step is resumable, so running the demo again after an interruption continues.
    """
    from tfpneumo.data.prepare import prepare_cache
    from tfpneumo.data.synth import synthesize

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data, cache = workdir / "demo-data", workdir / "demo-cache"
    cfg = load_config(find_config("demo"), [f"data.cache={cache}"])
    t0 = time.time()

    t = _step(f"synth: {N_TRAIN} train + {N_TEST} test DICOMs at {DICOM_SIZE} px")
    if not (data / "train-rle.csv").exists():
        print(synthesize(data, n_train=N_TRAIN, n_test=N_TEST, size=DICOM_SIZE, seed=SEED))
    print(f"   {time.time() - t:.0f} s")

    t = _step(f"prepare: cache at {CACHE_SIZE} px, {cfg.prepare.folds} folds")
    from tfpneumo.config import replace

    print(prepare_cache(data, cache, replace(cfg, prepare={"size": CACHE_SIZE})))
    print(f"   {time.time() - t:.0f} s")

    from tfpneumo.evaluation.report import evaluate
    from tfpneumo.inference.pictures import predict
    from tfpneumo.inference.submission import submit
    from tfpneumo.training.run import train

    t = _step("train: configs/demo.yaml, fold 0")
    print(train(cfg, [0], workdir))
    print(f"   {time.time() - t:.0f} s")

    t = _step("evaluate: threshold search on the out-of-fold predictions")
    print(evaluate(cfg, workdir=workdir))
    print(f"   {time.time() - t:.0f} s")

    run_root = workdir / "runs" / cfg.experiment
    submission = workdir / "submission.csv"
    t = _step("submit: test DICOMs, flip TTA, thresholds from evaluate")
    print(submit(cfg, out=submission, data=data, sample_submission=data / "sample_submission.csv",
                 size=CACHE_SIZE, workdir=workdir, progress=False))
    print(f"   {time.time() - t:.0f} s")

    t = _step("predict: one test image (one the submission gave a mask, if any)")
    one = _image_to_show(submission, sorted((data / "dicom-images-test").rglob("*.dcm")))
    predictions = workdir / "predictions"
    print(predict(cfg, [one], out=predictions, size=CACHE_SIZE, workdir=workdir))
    print(f"   {time.time() - t:.0f} s")

    evaluation = json.loads((run_root / "evaluation.json").read_text())
    result = json.loads((run_root / "fold_0" / "result.json").read_text())
    overlay = predictions / f"{one.stem}_overlay.png"
    paths = {
        "data": data, "cache": cache, "run": run_root / "fold_0",
        "evaluation": run_root / "evaluation.json", "heatmap": run_root / "evaluation_heatmap.png",
        "submission": submission, "overlay": overlay,
    }
    print(f"\n== done in {time.time() - t0:.0f} s")
    print(f"   validation Dice (best epoch)   {result['best_val_dice']:.4f}")
    print(f"   out-of-fold Dice, best rule    {evaluation['best']['score']:.4f} "
          f"({evaluation['best']['rule']})")
    print(f"   all-empty baseline             {evaluation['empty_score']:.4f}")
    for name, path in paths.items():
        print(f"   {name:<12} {path}")
    print(f"   tensorboard  tensorboard --logdir {run_root}")
    return paths


def _image_to_show(submission: Path, dicoms: list[Path]) -> Path:
    """The first test DICOM that got a mask in the submission, else the first one."""
    import csv

    with open(submission, newline="") as f:
        with_mask = {row["ImageId"] for row in csv.DictReader(f)
                     if row["EncodedPixels"].strip() != "-1"}
    return next((d for d in dicoms if d.stem in with_mask), dicoms[0])
