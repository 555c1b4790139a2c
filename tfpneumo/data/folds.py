"""Cross-validation folds of the training images, as ``tfpneumo prepare`` assigns them."""

from __future__ import annotations

import numpy as np

from tfpneumo.errors import TfpneumoError


class FoldError(TfpneumoError):
    """The training images cannot be split into the requested folds."""


def assign_folds(ids: list[str], has_mask: list[int], groups: list[str], folds: int,
                 by_patient: bool, seed: int) -> dict[str, int]:
    """Fold of each training id: StratifiedKFold on has_mask, or StratifiedGroupKFold on
    ``groups`` (PatientID) with ``by_patient``, shuffled with ``seed``. Deterministic."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(has_mask)
    for cls, name in ((1, "positive"), (0, "negative")):
        n = int((y == cls).sum())
        if n < folds:
            raise FoldError(f"only {n} {name} training image(s) for {folds} folds; need at "
                               f"least {folds} of each class (lower prepare.folds)")
    if by_patient:
        n_groups = len(set(groups))
        if n_groups < folds:
            raise FoldError(f"only {n_groups} patient(s) for {folds} folds with "
                               "group_by_patient")
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(ids)), y, groups)
    else:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(ids)), y)
    fold_of: dict[str, int] = {}
    for fold, (_, valid) in enumerate(splits):
        for i in valid:
            fold_of[ids[i]] = fold
    return fold_of
