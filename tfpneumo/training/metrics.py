"""The competition metric: mean over images of Dice, 1 when prediction and truth are both empty.

Numpy functions (:func:`per_image_dice`, :func:`kaggle_dice`) for evaluation on binary masks,
and a streaming ``keras.metrics.Metric`` (:class:`KaggleDice`) for validation inside
``model.fit`` on probability maps.

One metric instance per threshold (:func:`dice_metrics`) rather than one metric returning a
dict: Keras 3.15 does flatten a dict ``result()`` into the logs (checked: ``val_`` is kept),
but under ``compile(metrics={"mask": ...})`` the inner keys lose the output-name prefix
(``mask_``), so the same metric on two outputs overwrites itself. Separate instances named
``dice@0.5`` log as ``mask_dice@0.5`` and ``val_mask_dice@0.5``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from tfpneumo.errors import TfpneumoError


class MetricError(TfpneumoError):
    """Masks handed to a metric have incompatible shapes or the batch is empty."""


def _as_masks(x: Any, what: str) -> np.ndarray:
    """``(N, H, W)`` or ``(N, H, W, 1)`` binary/bool -> ``(N, H*W) bool``."""
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        raise MetricError(f"{what}: expected masks of shape (N, H, W) or (N, H, W, 1), "
                          f"got {x.shape}")
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2]).astype(bool)


def per_image_dice(pred: Any, true: Any) -> np.ndarray:
    """Dice per image ``(N,) float64``: 1 when both masks are empty, 0 when one only is.

    ``pred`` and ``true`` are binary/bool masks ``(N, H, W)`` or ``(N, H, W, 1)`` of the same
    size (nonzero = foreground).
    """
    p, t = _as_masks(pred, "pred"), _as_masks(true, "true")
    if p.shape != t.shape:
        raise MetricError(f"pred masks {p.shape} and true masks {t.shape} differ in shape "
                          "(as (N, H*W))")
    intersection = np.logical_and(p, t).sum(axis=1, dtype=np.int64)
    total = p.sum(axis=1, dtype=np.int64) + t.sum(axis=1, dtype=np.int64)
    return np.where(total == 0, 1.0, 2.0 * intersection / np.maximum(total, 1))


def kaggle_dice(pred_masks: Any, true_masks: Any) -> float:
    """The competition score: mean of :func:`per_image_dice` over the N images."""
    dice = per_image_dice(pred_masks, true_masks)
    if dice.size == 0:
        raise MetricError("kaggle_dice: no images")
    return float(dice.mean())


def batch_dice(y_true: Any, y_pred: Any, threshold: float = 0.5, min_area: int = 0) -> Any:
    """Tensor version: per-image Kaggle Dice ``(B,) float32`` of ``y_pred > threshold``.

    ``y_true`` 0/1 and ``y_pred`` probabilities ``(B, H, W, 1)`` (any dtype; counted in
    float32). A prediction with fewer than ``min_area`` pixels counts as empty.
    """
    t = ops.cast(ops.cast(y_true, "float32") > 0.5, "float32")
    p = ops.cast(ops.cast(y_pred, "float32") > threshold, "float32")
    batch = ops.shape(t)[0]
    t, p = ops.reshape(t, (batch, -1)), ops.reshape(p, (batch, -1))
    if min_area > 0:
        big_enough = ops.sum(p, axis=-1, keepdims=True) >= float(min_area)
        p = ops.where(big_enough, p, ops.zeros_like(p))
    intersection = ops.sum(p * t, axis=-1)
    total = ops.sum(p, axis=-1) + ops.sum(t, axis=-1)
    return ops.where(total > 0, 2.0 * intersection / ops.maximum(total, 1.0),
                     ops.ones_like(total))


@keras.saving.register_keras_serializable(package="tfpneumo")
class KaggleDice(keras.metrics.Metric):
    """Streaming Kaggle Dice at one threshold: sum of per-image Dice / number of images.

    ``update_state(y_true (B,H,W,1), y_pred (B,H,W,1) probabilities, sample_weight=None)``;
    ``sample_weight`` (optional, ``(B,)`` or ``(B, 1)``) weighs images. The default name is
    ``dice@<threshold>``, e.g. ``dice@0.5``. Predicted masks smaller than ``min_area`` pixels
    count as empty (the competition's "minimum area" gate).
    """

    def __init__(self, threshold: float = 0.5, min_area: int = 0, name: str | None = None,
                 dtype: Any = None):
        super().__init__(name=name or f"dice@{threshold:g}", dtype=dtype or "float32")
        if not 0.0 <= threshold < 1.0:
            raise MetricError(f"{self.name}: threshold must be in [0, 1), got {threshold}")
        if min_area < 0:
            raise MetricError(f"{self.name}: min_area must be >= 0, got {min_area}")
        self.threshold = float(threshold)
        self.min_area = int(min_area)
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float32",
                                       name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float32",
                                       name="count")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        dice = batch_dice(y_true, y_pred, self.threshold, self.min_area)
        if sample_weight is None:
            weight = ops.ones_like(dice)
        else:
            weight = ops.cast(sample_weight, "float32")
            weight = ops.broadcast_to(ops.reshape(weight, (-1,)), ops.shape(dice))
        self.total.assign_add(ops.sum(dice * weight))
        self.count.assign_add(ops.sum(weight))

    def result(self) -> Any:
        return ops.divide_no_nan(self.total, self.count)

    def reset_state(self) -> None:
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "threshold": self.threshold,
                "min_area": self.min_area}


def dice_metrics(thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6),
                 min_area: int = 0) -> list[KaggleDice]:
    """One :class:`KaggleDice` per threshold (names ``dice@0.3`` ...), for ``compile``."""
    return [KaggleDice(threshold=t, min_area=min_area) for t in thresholds]
