"""Out-of-fold statistics: what training keeps of its validation predictions.

For each validation image, ``oof.npz`` holds two histograms of the mask probability
(``HIST_BINS`` bins, over all pixels and over truth pixels), the label probability, the
truth's has-mask flag and the pixel count. From them every rule "pixel on when prob >= t"
with ``t`` on a bin edge ``k / HIST_BINS`` is scored exactly, so evaluation never needs a
probability map. Bin ``b`` holds ``[b / bins, (b + 1) / bins)`` (1.0 in the last bin).

Those keys describe the mean of the TTA members (an image and its flip). With two or more
members the file also holds ``hist_all_<merge>``, ``hist_true_<merge>`` and
``label_prob_<merge>`` for the other merges of
:data:`~tfpneumo.evaluation.rules.MERGES`, so ``evaluate`` can choose how to merge.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfpneumo import runs
from tfpneumo.errors import TfpneumoError, first_line

HIST_BINS = 256
OOF_KEYS = ("image_id", "label_prob", "has_mask", "hist_all", "hist_true", "pixels")
MERGED_KEYS = ("label_prob", "hist_all", "hist_true")  # one set per merge, "<key>_<merge>"


# ----------------------------------------------------------------------------- collecting (TF)

def probability_histograms(probs, truth, bins: int = HIST_BINS):
    """Per-image histograms of the mask probability over all pixels and over truth pixels.

    probs (B, H, W, 1) float32 in [0, 1], truth (B, H, W, 1) 0/1 -> two (B, bins) int32.
    Bin ``b`` holds probabilities in ``[b / bins, (b + 1) / bins)`` (1.0 in the last bin).
    From these, any rule "pixel > t" is scored exactly for t on the bin edges, so out-of-fold
    predictions need no full-size probability maps.
    """
    import tensorflow as tf

    batch = tf.shape(probs)[0]
    index = tf.clip_by_value(tf.cast(tf.reshape(probs, [batch, -1]) * bins, tf.int32), 0, bins - 1)
    index += tf.range(batch)[:, None] * bins
    weights = tf.cast(tf.reshape(truth, [batch, -1]) > 0.5, tf.int32)
    flat = tf.reshape(index, [-1])
    hist_all = tf.math.bincount(flat, minlength=batch * bins, maxlength=batch * bins)
    hist_true = tf.math.bincount(flat, weights=tf.reshape(weights, [-1]),
                                 minlength=batch * bins, maxlength=batch * bins)
    return (tf.reshape(hist_all, [batch, bins]),
            tf.reshape(tf.cast(hist_true, tf.int32), [batch, bins]))


def out_of_fold_statistics(net, dataset, hflip: bool = True) -> dict[str, np.ndarray]:
    """Runs ``net`` over an eval dataset (elements with image, mask, label, image_id).

    Returns compact per-image arrays: ``image_id`` (N,) str, ``label_prob`` (N,) float32,
    ``has_mask`` (N,) int8, ``hist_all`` and ``hist_true`` (N, 256) int32, ``pixels`` (N,)
    int64, all of the mean of the TTA members; with ``hflip`` also ``<key>_<merge>`` of the
    other merges (see the module docstring). Memory is flat in image size: no probability
    map is kept.
    """

    import tensorflow as tf

    from tfpneumo.evaluation.rules import MERGES
    from tfpneumo.inference.ensemble import flip_members, mean_of_flips, merge_members

    merges = MERGES if hflip else ("mean",)  # one member: every merge is the member itself

    @tf.function(reduce_retracing=True)
    def step(images, masks):
        members, labels = flip_members(net, images, hflip)  # one forward for every merge
        probs, label = mean_of_flips(members, labels)  # the mean, exactly as submit's
        out = {"mean": (label, *probability_histograms(probs, masks))}
        if len(merges) > 1:
            members, labels = tf.stack(members), tf.stack(labels)
            for merge in merges[1:]:
                out[merge] = (merge_members(labels, merge),
                              *probability_histograms(merge_members(members, merge), masks))
        return out

    ids, has_mask = [], []
    parts: dict[str, list] = {m: [] for m in merges}
    for batch in dataset:
        out = step(batch["image"], batch["mask"])
        ids.extend(x.decode() for x in batch["image_id"].numpy())
        has_mask.append(batch["label"].numpy().reshape(-1))
        for merge in merges:
            parts[merge].append([t.numpy() for t in out[merge]])
    if not ids:
        raise ValueError("the evaluation dataset is empty")
    stats: dict[str, np.ndarray] = {"image_id": np.array(ids),
                                    "has_mask": (np.concatenate(has_mask) > 0.5).astype(np.int8)}
    for merge in merges:
        suffix = "" if merge == "mean" else f"_{merge}"
        label, hist_all, hist_true = (np.concatenate(x) for x in zip(*parts[merge], strict=True))
        stats[f"label_prob{suffix}"] = label.astype(np.float32)
        stats[f"hist_all{suffix}"] = hist_all.astype(np.int32)
        stats[f"hist_true{suffix}"] = hist_true.astype(np.int32)
    stats["pixels"] = stats["hist_all"].sum(axis=1).astype(np.int64)
    return stats



# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class OofStats:
    """Out-of-fold statistics of N images (several folds concatenated).

    image_id (N,) str, fold (N,) int64, label_prob (N,) float32, has_mask (N,) int8,
    hist_all and hist_true (N, bins) int32 (bin b = [b/bins, (b+1)/bins)), pixels (N,) int64.
    """

    image_id: np.ndarray
    fold: np.ndarray
    label_prob: np.ndarray
    has_mask: np.ndarray
    hist_all: np.ndarray
    hist_true: np.ndarray
    pixels: np.ndarray

    def __len__(self) -> int:
        return len(self.image_id)

    @property
    def bins(self) -> int:
        return self.hist_all.shape[1]

    def subset(self, index: np.ndarray) -> OofStats:
        return OofStats(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    @staticmethod
    def concat(parts: Sequence[OofStats]) -> OofStats:
        fields = OofStats.__dataclass_fields__
        return OofStats(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def _rerun(path: Path, fold: int) -> str:
    """How to make ``path`` again: ``train`` writes it when a fold finishes (a rerun of a
    finished fold keeps its folder as it is)."""
    return (f"train writes it: move {path.parent} away, rerun `tfpneumo train --fold {fold}`, "
            "then `tfpneumo evaluate`")


def _read_oof_arrays(path: Path, fold: int) -> dict[str, np.ndarray]:
    """The arrays of one ``oof.npz`` (with ``model`` when present); a file that is not a whole
    numpy archive (truncated, corrupt, not a zip) is a one-line error naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in OOF_KEYS if k not in data.files]
            if missing:
                raise TfpneumoError(f"{path}: not an OOF statistics file (missing {missing}); "
                                    f"{_rerun(path, fold)}")
            merged = [k for k in data.files if k.startswith(tuple(f"{m}_" for m in MERGED_KEYS))]
            return {k: data[k] for k in {*OOF_KEYS, "model", *merged} if k in data.files}
    # A cut-off zip: BadZipFile (central directory gone), EOFError or zlib.error (a member cut
    # short), ValueError (a bad npy header or CRC); not a zip at all: ValueError (pickle).
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise TfpneumoError(f"{path}: cannot read OOF statistics, truncated or corrupt "
                            f"({first_line(e, 120)}); {_rerun(path, fold)}") from e


def load_oof(path: Path, fold: int, merge: str = "mean") -> OofStats:
    """Reads and checks one ``oof.npz`` (the statistics of ``merge``); any problem is a
    one-line error naming the file."""
    return _check_oof(path, fold, _of_merge(path, _read_oof_arrays(path, fold), merge))


def merges_in(arrays: dict[str, np.ndarray]) -> list[str]:
    """The merges an ``oof.npz``'s arrays describe, ``mean`` first (in MERGES order)."""
    from tfpneumo.evaluation.rules import MERGES

    return [m for m in MERGES
            if m == "mean" or all(f"{k}_{m}" in arrays for k in MERGED_KEYS)]


def _of_merge(path: Path, arrays: dict[str, np.ndarray], merge: str) -> dict[str, np.ndarray]:
    """The arrays with the statistics of ``merge`` under the plain keys."""
    if merge == "mean":
        return arrays
    if merge not in merges_in(arrays):
        raise TfpneumoError(f"{path}: no statistics of the {merge} merge (it holds "
                            f"{', '.join(merges_in(arrays))}: written without flip TTA, or before "
                            "merges were recorded)")
    return {**arrays, **{k: arrays[f"{k}_{merge}"] for k in MERGED_KEYS}}


def _check_oof(path: Path, fold: int, arrays: dict[str, np.ndarray]) -> OofStats:
    for key in OOF_KEYS:
        if key != "image_id" and arrays[key].dtype.kind not in "biuf":
            raise TfpneumoError(f"{path}: {key} holds {arrays[key].dtype}, not numbers "
                                f"(corrupt statistics); {_rerun(path, fold)}")
    hist_all, hist_true = arrays["hist_all"], arrays["hist_true"]
    n = len(arrays["image_id"])
    if n == 0:
        raise TfpneumoError(f"{path}: no images")
    if hist_all.ndim != 2 or hist_all.shape != hist_true.shape or hist_all.shape[0] != n:
        raise TfpneumoError(f"{path}: hist_all {hist_all.shape} and hist_true {hist_true.shape} "
                            f"must both be ({n}, bins)")
    for key in ("label_prob", "has_mask", "pixels"):
        if arrays[key].shape != (n,):
            raise TfpneumoError(f"{path}: {key} has shape {arrays[key].shape}, expected ({n},)")
    if np.any(hist_true > hist_all) or np.any(hist_true < 0):
        raise TfpneumoError(f"{path}: hist_true exceeds hist_all (corrupt statistics); "
                            f"{_rerun(path, fold)}")
    if np.any(hist_all.sum(axis=1, dtype=np.int64) != arrays["pixels"]):
        raise TfpneumoError(f"{path}: histogram sums differ from pixels (corrupt statistics); "
                            f"{_rerun(path, fold)}")
    return OofStats(
        image_id=arrays["image_id"].astype(str),
        fold=np.full(n, fold, np.int64),
        label_prob=arrays["label_prob"].astype(np.float32),
        has_mask=arrays["has_mask"].astype(np.int8),
        hist_all=hist_all.astype(np.int32),
        hist_true=hist_true.astype(np.int32),
        pixels=arrays["pixels"].astype(np.int64),
    )


def load_run_oof(experiment: str, folds: Sequence[int], workdir: str | Path = ".",
                 weights: str = "auto") -> tuple[OofStats, dict[int, str]]:
    """The OOF statistics of ``weights``' networks of trained ``folds`` concatenated, and the
    kind of network (swa, topk, best, final) each fold's statistics describe. One image size
    and bin count only. The mean of the TTA members; :func:`load_run_oof_merges` for all."""
    by_merge, models = load_run_oof_merges(experiment, folds, workdir, weights)
    return by_merge["mean"], models


def load_run_oof_merges(experiment: str, folds: Sequence[int], workdir: str | Path = ".",
                        weights: str = "auto") -> tuple[dict[str, OofStats], dict[int, str]]:
    """As :func:`load_run_oof`, for every merge that all the folds' files hold:
    ``{merge: stats}`` with ``mean`` first."""
    files, models = [], {}
    for k in folds:
        path = runs.fold_dir(experiment, k, workdir) / runs.oof_name(weights)
        if not path.exists() and weights != "auto":
            raise TfpneumoError(f"{path}: no out-of-fold statistics for --weights {weights} "
                                f"(fold {k} has no {runs.NETWORKS[weights]}, or was trained "
                                "by tfpneumo < 0.3); try --weights auto")
        if not path.exists():
            raise TfpneumoError(f"{path}: missing although {runs.RESULT} exists; "
                                f"rerun tfpneumo train --fold {k}")
        arrays = _read_oof_arrays(path, k)
        files.append((path, k, arrays))
        models[k] = str(arrays["model"]) if "model" in arrays else "?"
    merges = [m for m in merges_in(files[0][2]) if all(m in merges_in(a) for _, _, a in files)]
    by_merge = {}
    for merge in merges:
        parts = [_check_oof(path, k, _of_merge(path, arrays, merge)) for path, k, arrays in files]
        stats = OofStats.concat(parts)
        if len({p.bins for p in parts}) != 1 or len(np.unique(stats.pixels)) != 1:
            raise TfpneumoError(f"{runs.run_root(experiment, workdir)}: the folds' OOF statistics "
                                f"mix image sizes or bins (pixels "
                                f"{sorted(set(stats.pixels.tolist()))}); evaluate folds trained "
                                "on the same cache")
        by_merge[merge] = stats
    return by_merge, models


# ----------------------------------------------------------------------------- scoring

def counts_above(hist: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Pixels in bins >= each edge: hist (N, bins) int, edges (K,) in [0, bins] -> (N, K) int64."""
    tail = np.cumsum(hist[:, ::-1], axis=1, dtype=np.int64)[:, ::-1]
    tail = np.concatenate([tail, np.zeros((len(hist), 1), np.int64)], axis=1)
    return tail[:, edges]


def dice(pred_area: np.ndarray, inter: np.ndarray, truth_area: np.ndarray) -> np.ndarray:
    """Competition Dice from areas (any matching shapes): 1 when both are empty. float64."""
    denom = pred_area + truth_area
    return np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1))


def dice_from_histograms(stats: dict[str, np.ndarray], threshold: float,
                         label_threshold: float | None = None) -> float:
    """Mean per-image Dice of the mask ``prob > threshold`` from the OOF histograms.

    With ``label_threshold``, images whose ``label_prob`` is not above it are predicted empty.
    Exact for thresholds on the bin edges (multiples of 1/256); 1.0 for an image where both
    prediction and truth are empty, as in the competition metric.
    """
    hist_all, hist_true = stats["hist_all"], stats["hist_true"]
    truth_area = hist_true.sum(axis=1)
    if label_threshold is not None:
        keep = (stats["label_prob"] > label_threshold)[:, None]
        hist_all, hist_true = hist_all * keep, hist_true * keep
    first = int(np.ceil(threshold * hist_all.shape[1] - 1e-9))
    pred = hist_all[:, first:].sum(axis=1)
    inter = hist_true[:, first:].sum(axis=1)
    denom = pred + truth_area
    dice = np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1))
    return float(dice.mean())


