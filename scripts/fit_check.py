"""Can the path from real DICOMs to masks learn at all? A fit check on real radiographs.

Prepares the labelled real DICOMs of a SIIM folder (default ../shared/siim/siim-mini: 48
images, 15 with a pneumothorax) at the recipe's size with ``tfpneumo prepare``'s code, trains
fold 0 of the recipe with ``tfpneumo train``'s code, then scores the trained network on its
own training images (the other folds) and the all-empty prediction on the same images. A
recipe that can learn drives the training-set score well above all-empty; one that cannot
(wrong input convention, broken labels, a loss without gradient) stays at all-empty.

    python scripts/fit_check.py --out fitcheck [--data ../shared/siim/siim-mini] [--config demo]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "siim" / "siim-mini"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--folds", type=int, default=4, help="prepare.folds; fold 0 is held out")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import tfpneumo
    from tfpneumo.config import find_config, load_config, replace
    from tfpneumo.data.pipeline import eval_dataset
    from tfpneumo.evaluation.oof import dice_from_histograms, out_of_fold_statistics
    from tfpneumo.models.saved import load_network
    from tfpneumo.runs import fold_dir, network_file

    out = args.out.resolve()
    cache = out / "cache"
    cfg = load_config(find_config(args.config), [
        *args.overrides, f"data.cache={cache}", "experiment=fit-check",
        "train.tensorboard_images=0", f"prepare.folds={args.folds}"])
    print(tfpneumo.prepare(args.data, cache, replace(cfg, prepare={"size": cfg.data.image_size}),
                           progress=False))
    print(tfpneumo.train(cfg, [0], out))
    net = load_network(network_file(fold_dir(cfg.experiment, 0, out)))
    parts = [out_of_fold_statistics(net, eval_dataset(cache, k, cfg, split="val"))
             for k in range(1, args.folds)]
    stats = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    grid = np.round(np.arange(0.1, 0.91, 0.05), 2)
    rules = {(t, g): dice_from_histograms(stats, t, g) for t in grid for g in (None, *grid)}
    (top, gate), score = max(rules.items(), key=lambda kv: kv[1])
    empty = float(np.mean(stats["hist_true"].sum(axis=1) == 0))
    report = {"images": len(stats["image_id"]), "positives": int((stats["has_mask"] > 0).sum()),
              "training_set_score": score, "mask_threshold": float(top),
              "label_threshold": None if gate is None else float(gate),
              "all_empty": empty, "mask_dice_at_0.5": rules[(0.5, None)]}
    (out / "fit_check.json").write_text(json.dumps(report, indent=1))
    print(f"fit check on {report['images']} real training images ({report['positives']} "
          f"positive): best rule {score:.3f} (mask > {top:g}"
          f"{'' if gate is None else f', label > {gate:g}'}) vs all-empty {empty:.3f}")


if __name__ == "__main__":
    main()
