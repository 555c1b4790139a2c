"""The run folder: what ``train`` writes and ``evaluate``, ``submit`` and ``predict`` read.

``<workdir>/runs/<experiment>/``::

    fold_<k>/
        config.yaml            resolved config
        history.csv            one row per epoch (losses, val Dice per threshold, AUC, lr)
        state/                 last completed epoch: weights + optimizer + SWA (resume)
        checkpoints/           top-k weights by validation Dice
        best.weights.h5        best checkpoint; final.weights.h5 the last epoch's weights
        tensorboard/           scalars and image panels
        final.keras best.keras [swa.keras] [topk.keras]   saved networks (safe_mode loadable)
        oof.npz                out-of-fold statistics of the selected network
        result.json            summary; written last: a fold with it is trained
        stages/<name>/         one such folder per stage when the config has several
    evaluation.json evaluation_images.csv evaluation_heatmap.png      (tfpneumo evaluate)

This module is the only place that knows these names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from tfpneumo.errors import TfpneumoError

CONFIG = "config.yaml"
HISTORY = "history.csv"
STATE = "state"
CHECKPOINTS = "checkpoints"
BEST_WEIGHTS = "best.weights.h5"
FINAL_WEIGHTS = "final.weights.h5"
TENSORBOARD = "tensorboard"
OOF = "oof.npz"
RESULT = "result.json"  # a fold's; written last
STAGE_RESULT = "stage.json"  # a stage's; written last
STAGES = "stages"
EVALUATION_JSON = "evaluation.json"
EVALUATION_IMAGES = "evaluation_images.csv"
EVALUATION_HEATMAP = "evaluation_heatmap.png"

# Saved networks by kind; "auto" takes the first that exists in this order.
NETWORKS = {"swa": "swa.keras", "best": "best.keras", "final": "final.keras", "topk": "topk.keras"}
WEIGHTS = ("auto", *NETWORKS)
AUTO_ORDER = ("swa", "best", "final")
# What a multi-stage run copies from its last stage into the fold folder.
FOLD_ARTEFACTS = (*NETWORKS.values(), OOF, HISTORY, BEST_WEIGHTS)

FoldSpec = Literal["all"] | Sequence[int]
_FOLD_DIR = re.compile(r"fold_(\d+)")


def run_root(experiment: str, workdir: str | Path = ".") -> Path:
    """``<workdir>/runs/<experiment>``."""
    return Path(workdir) / "runs" / experiment


def fold_dir(experiment: str, fold: int, workdir: str | Path = ".") -> Path:
    return run_root(experiment, workdir) / f"fold_{fold}"


def fold_of(folder: Path) -> int:
    """The fold index of a ``fold_<k>`` folder (or of a file inside one)."""
    for part in (folder.name, folder.parent.name):
        if m := _FOLD_DIR.fullmatch(part):
            return int(m.group(1))
    raise ValueError(f"{folder}: not inside a fold_<k> folder")


def trained_folds(experiment: str, workdir: str | Path = ".") -> list[int]:
    """Indices k whose ``fold_<k>/result.json`` exists (training finished), sorted."""
    root = run_root(experiment, workdir)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if (m := _FOLD_DIR.fullmatch(p.name)) and (p / RESULT).is_file())


def resolve_trained_folds(experiment: str, folds: FoldSpec, workdir: str | Path = ".") -> list[int]:
    """``"all"`` -> every trained fold; indices -> those, each of which must be trained."""
    root = run_root(experiment, workdir)
    if isinstance(folds, str):
        if folds != "all":
            raise TfpneumoError(f"folds {folds!r}: expected 'all' or fold indices")
        found = trained_folds(experiment, workdir)
        if not found:
            raise TfpneumoError(f"{root}: no trained fold (no fold_<k>/{RESULT}); "
                                "run tfpneumo train first")
        return found
    wanted = sorted(set(int(k) for k in folds))
    if not wanted or wanted[0] < 0:
        raise TfpneumoError(f"folds {list(folds)}: expected 'all' or fold indices >= 0")
    for k in wanted:
        if not (fold_dir(experiment, k, workdir) / RESULT).is_file():
            raise TfpneumoError(f"{fold_dir(experiment, k, workdir) / RESULT}: fold {k} is not "
                                f"trained (or its training did not finish); run tfpneumo train "
                                f"--fold {k} or choose other folds")
    return wanted


def network_file(folder: Path, weights: str = "auto") -> Path:
    """The saved network of one fold folder: ``weights`` one of :data:`WEIGHTS`."""
    if weights not in WEIGHTS:
        raise TfpneumoError(f"--weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    if weights == "auto":
        found = (folder / NETWORKS[k] for k in AUTO_ORDER)
        path = next((p for p in found if p.is_file()), folder / NETWORKS["final"])
    else:
        path = folder / NETWORKS[weights]
    if not path.is_file():
        raise TfpneumoError(f"{path}: model file not found (try --weights auto)")
    return path


def ensemble_files(experiment: str, folds: FoldSpec = "all", weights: str = "auto",
                   workdir: str | Path = ".") -> list[Path]:
    """The saved network of each requested trained fold, in fold order."""
    return [network_file(fold_dir(experiment, k, workdir), weights)
            for k in resolve_trained_folds(experiment, folds, workdir)]
