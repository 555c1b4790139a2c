"""Segmentation and classification losses: pure ``keras.ops`` functions, then thin Loss classes.

Every ``*_per_image`` function takes ``y_true`` 0/1 and ``y_pred`` probabilities (or logits for
:func:`lovasz_hinge_per_image`) of shape ``(B, H, W, 1)`` (any shape ``(B, ...)`` works: the
label head's ``(B, 1)`` too) and returns the per-image loss ``(B,) float32``. Inputs are cast
to float32 first and every reduction runs in float32: under mixed precision the model's
predictions may be float16/bfloat16, and a float16 sum over a 1024x1024 map overflows.

The scalar versions (:func:`bce`, :func:`dice_loss`, ... :func:`lovasz_hinge`) are the mean
over images. The ``keras.losses.Loss`` classes return the per-image vector from ``call()``
and let Keras reduce it (see :class:`_PerImageLoss` for why); :class:`MaskLoss` is the
training wrapper that averages over images with a non-empty truth only, and
:func:`build_losses` turns a :class:`~tfpneumo.config.LossConfig` into ``model.compile``
arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import keras
from keras import ops

from tfpneumo.config import LossConfig
from tfpneumo.errors import TfpneumoError

EPSILON = 1e-7
"""Probabilities are clipped to ``[EPSILON, 1 - EPSILON]`` before a log (logit range +-16.1)."""

MASK_KINDS = ("bce", "dice", "log_dice", "focal", "lovasz", "ohem_bce", "combo")


class LossError(TfpneumoError):
    """A loss was asked for with an unknown kind or an invalid parameter."""


# ----------------------------------------------------------------------------- helpers

def _flat(x: Any) -> Any:
    """``(B, ...)`` any float dtype -> ``(B, N) float32`` (N static when the shape is)."""
    x = ops.cast(x, "float32")
    shape = ops.shape(x)
    rest = shape[1:]
    if all(isinstance(d, int) for d in rest):
        return ops.reshape(x, (-1, math.prod(rest)))
    # Spatial size unknown while tracing: only the batch can stand in for -1's partner.
    return ops.reshape(x, (shape[0], -1))


def _clip(p: Any, epsilon: float) -> Any:
    return ops.clip(p, epsilon, 1.0 - epsilon)


def _bce_pixels(t: Any, p: Any, epsilon: float) -> Any:
    """Per-pixel binary cross-entropy on probabilities ``(B, N) float32`` -> ``(B, N)``."""
    p = _clip(p, epsilon)
    return -(t * ops.log(p) + (1.0 - t) * ops.log1p(-p))


def prob_to_logit(p: Any, epsilon: float = EPSILON) -> Any:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[epsilon, 1 - epsilon]``; float32 out."""
    p = _clip(ops.cast(p, "float32"), epsilon)
    return ops.log(p) - ops.log1p(-p)


def ohem_k(num_pixels: int, ratio: float) -> int:
    """Pixels kept per image by OHEM: ``ceil(ratio * num_pixels)`` clamped to ``[1, N]``.

    A 1e-9 slack keeps float noise (``0.1 * 30 = 3.0000000000000004``) from adding a pixel.
    """
    return min(num_pixels, max(1, math.ceil(ratio * num_pixels - 1e-9)))


# ----------------------------------------------------------------------------- pure losses

def bce_per_image(y_true: Any, y_pred: Any, epsilon: float = EPSILON) -> Any:
    """Mean pixel BCE per image on probabilities: ``(B, ...)`` -> ``(B,) float32``."""
    return ops.mean(_bce_pixels(_flat(y_true), _flat(y_pred), epsilon), axis=-1)


def _dice_per_image(y_true: Any, y_pred: Any, smooth: float) -> Any:
    t, p = _flat(y_true), _flat(y_pred)
    intersection = ops.sum(p * t, axis=-1)
    total = ops.sum(p, axis=-1) + ops.sum(t, axis=-1)
    return (2.0 * intersection + smooth) / (total + smooth)


def dice_loss_per_image(y_true: Any, y_pred: Any, smooth: float = 1.0) -> Any:
    """Soft Dice loss ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` per image -> ``(B,)``."""
    return 1.0 - _dice_per_image(y_true, y_pred, smooth)


def log_dice_loss_per_image(y_true: Any, y_pred: Any, gamma: float = 0.3,
                            smooth: float = 1.0) -> Any:
    """``(-log(dice))^gamma`` per image -> ``(B,)``; exactly 0 (zero gradient) when dice is 1.

    ``x^gamma`` has an infinite slope at 0 for ``gamma < 1``, so the perfect case is
    special-cased with ``where`` on a safe operand instead of adding an epsilon (which would
    make a perfect prediction cost ``eps^gamma``, 0.008 for 1e-7 and gamma 0.3).
    """
    x = ops.maximum(-ops.log(_dice_per_image(y_true, y_pred, smooth)), 0.0)
    positive = x > 0.0
    safe = ops.where(positive, x, ops.ones_like(x))
    return ops.where(positive, ops.power(safe, gamma), ops.zeros_like(x))


def focal_per_image(y_true: Any, y_pred: Any, gamma: float = 2.0, alpha: float = 0.25,
                    epsilon: float = EPSILON) -> Any:
    """Binary focal loss (Lin et al. 2017), mean over pixels per image -> ``(B,)``.

    ``-alpha t (1-p)^gamma log(p) - (1-alpha) (1-t) p^gamma log(1-p)``: alpha weighs the
    positive pixels, as in RetinaNet.
    """
    t, p = _flat(y_true), _clip(_flat(y_pred), epsilon)
    pos = alpha * t * ops.power(1.0 - p, gamma) * ops.log(p)
    neg = (1.0 - alpha) * (1.0 - t) * ops.power(p, gamma) * ops.log1p(-p)
    return -ops.mean(pos + neg, axis=-1)


def _lovasz_grad(gt_sorted: Any) -> Any:
    """Gradient of the Lovász extension of the Jaccard loss, ``(B, N)`` sorted truths."""
    gts = ops.sum(gt_sorted, axis=-1, keepdims=True)
    intersection = gts - ops.cumsum(gt_sorted, axis=-1)
    union = gts + ops.cumsum(1.0 - gt_sorted, axis=-1)  # >= 1 everywhere: no 0/0
    jaccard = 1.0 - intersection / union
    previous = ops.concatenate([ops.zeros_like(jaccard[:, :1]), jaccard[:, :-1]], axis=-1)
    return jaccard - previous


def lovasz_hinge_per_image(y_true: Any, logits: Any) -> Any:
    """Lovász hinge per image (Berman et al. 2018) on logits: ``(B, ...)`` -> ``(B,)``.

    ``errors = 1 - logits * (2 t - 1)`` sorted descending; loss = ``relu(errors_sorted) .
    lovasz_grad(t_sorted)``. An image with empty truth costs ``relu(1 + max(logits))``
    (the reference's jaccard is 1 from the first pixel on). Sorting uses ``ops.argsort``
    and ``ops.take_along_axis``, which trace with static shapes and compile under XLA.
    """
    t, z = _flat(y_true), _flat(logits)
    errors = 1.0 - z * (2.0 * t - 1.0)
    order = ops.argsort(-errors, axis=-1)
    errors_sorted = ops.take_along_axis(errors, order, axis=-1)
    gt_sorted = ops.take_along_axis(t, order, axis=-1)
    grad = ops.stop_gradient(_lovasz_grad(gt_sorted))
    return ops.sum(ops.relu(errors_sorted) * grad, axis=-1)


def lovasz_hinge_prob_per_image(y_true: Any, y_pred: Any, epsilon: float = EPSILON) -> Any:
    """:func:`lovasz_hinge_per_image` on probabilities (converted with :func:`prob_to_logit`)."""
    return lovasz_hinge_per_image(y_true, prob_to_logit(y_pred, epsilon))


def ohem_bce_per_image(y_true: Any, y_pred: Any, ratio: float = 0.1,
                       epsilon: float = EPSILON) -> Any:
    """Mean BCE over the ``ohem_k(N, ratio)`` hardest pixels of each image -> ``(B,)``."""
    pixels = _bce_pixels(_flat(y_true), _flat(y_pred), epsilon)
    n = pixels.shape[-1]
    if isinstance(n, int):
        hardest, _ = ops.top_k(pixels, ohem_k(n, ratio), sorted=False)
        return ops.mean(hardest, axis=-1)
    # Unknown size while tracing: sort and mask the first k instead of top_k with a tensor k.
    n = ops.cast(ops.shape(pixels)[-1], "float32")
    k = ops.clip(ops.ceil(ratio * n - 1e-6), 1.0, n)
    ranked = -ops.sort(-pixels, axis=-1)
    keep = ops.cast(ops.arange(ops.shape(pixels)[-1]), "float32") < k
    return ops.sum(ops.where(keep, ranked, 0.0), axis=-1) / k


def combo_per_image(y_true: Any, y_pred: Any, bce_weight: float = 3.0,
                    dice_weight: float = 1.0, focal_weight: float = 4.0,
                    lovasz_weight: float = 0.0, focal_gamma: float = 2.0,
                    focal_alpha: float = 0.25, smooth: float = 1.0,
                    epsilon: float = EPSILON) -> Any:
    """Weighted sum of BCE, Dice, focal and Lovász per image -> ``(B,)`` (1st place: 3:1:4).

    Terms with weight 0 are not computed (the Lovász sort is the expensive one).
    """
    terms = []
    if bce_weight:
        terms.append(bce_weight * bce_per_image(y_true, y_pred, epsilon))
    if dice_weight:
        terms.append(dice_weight * dice_loss_per_image(y_true, y_pred, smooth))
    if focal_weight:
        terms.append(focal_weight * focal_per_image(y_true, y_pred, focal_gamma, focal_alpha,
                                                    epsilon))
    if lovasz_weight:
        terms.append(lovasz_weight * lovasz_hinge_prob_per_image(y_true, y_pred, epsilon))
    if not terms:
        raise LossError("combo loss: every weight is 0")
    return sum(terms[1:], terms[0])


def bce(y_true: Any, y_pred: Any, epsilon: float = EPSILON) -> Any:
    """Scalar: mean over images of :func:`bce_per_image`."""
    return ops.mean(bce_per_image(y_true, y_pred, epsilon))


def dice_loss(y_true: Any, y_pred: Any, smooth: float = 1.0) -> Any:
    """Scalar: mean over images of :func:`dice_loss_per_image`."""
    return ops.mean(dice_loss_per_image(y_true, y_pred, smooth))


def log_dice_loss(y_true: Any, y_pred: Any, gamma: float = 0.3, smooth: float = 1.0) -> Any:
    """Scalar: mean over images of :func:`log_dice_loss_per_image`."""
    return ops.mean(log_dice_loss_per_image(y_true, y_pred, gamma, smooth))


def focal_loss(y_true: Any, y_pred: Any, gamma: float = 2.0, alpha: float = 0.25,
               epsilon: float = EPSILON) -> Any:
    """Scalar: mean over images of :func:`focal_per_image`."""
    return ops.mean(focal_per_image(y_true, y_pred, gamma, alpha, epsilon))


def lovasz_hinge(y_true: Any, logits: Any) -> Any:
    """Scalar: mean over images of :func:`lovasz_hinge_per_image`; ``logits`` ``(B, H, W, 1)``."""
    return ops.mean(lovasz_hinge_per_image(y_true, logits))


def ohem_bce(y_true: Any, y_pred: Any, ratio: float = 0.1, epsilon: float = EPSILON) -> Any:
    """Scalar: mean over images of :func:`ohem_bce_per_image`."""
    return ops.mean(ohem_bce_per_image(y_true, y_pred, ratio, epsilon))


def combo_loss(y_true: Any, y_pred: Any, **weights: float) -> Any:
    """Scalar: mean over images of :func:`combo_per_image` (same keyword arguments)."""
    return ops.mean(combo_per_image(y_true, y_pred, **weights))


def positive_images(y_true: Any) -> Any:
    """``(B,) float32``: 1 where the truth mask has a pixel > 0.5, else 0."""
    return ops.cast(ops.max(_flat(y_true), axis=-1) > 0.5, "float32")


def _global_sum(value: Any) -> tuple[Any, float]:
    """``(sum of value over replicas, replica count)``; ``(value, 1)`` outside tf.distribute.

    Needed so that "mean over positive images" divides by the positives of the *global*
    batch: one replica's batch may hold none while another holds several.
    """
    if keras.backend.backend() != "tensorflow":
        return value, 1.0
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()  # None in a cross-replica context
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value, 1.0
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value), float(ctx.num_replicas_in_sync)


# ----------------------------------------------------------------------------- Loss classes

class _PerImageLoss(keras.losses.Loss):
    """Base: ``call()`` returns the per-image loss ``(B,) float32``; Keras does the reduction.

    Why a ``(B,)`` vector and not a scalar from ``call()`` (keras/src/losses/loss.py, 3.15):
    ``Loss.__call__`` hands ``call()``'s output to ``reduce_weighted_values``, whose
    ``reduce_values`` returns a 0-d value *unchanged*: it neither divides by the batch nor
    applies ``scale_loss_for_distribution`` (multiply by ``1 / num_replicas_in_sync``), and
    the trainer does not scale the compiled loss again. Under ``MirroredStrategy`` the
    optimizer all-reduces gradients with SUM, so a scalar mean would give gradients
    ``num_replicas`` times too large, and a ``(B,)`` ``sample_weight`` would broadcast a
    scalar into a vector. With a ``(B,)`` vector and the default ``"sum_over_batch_size"``
    Keras computes ``sum(w_i * l_i) / B_local / num_replicas``, i.e. the mean over the
    global batch after the gradient all-reduce, and per-image sample weights work.
    """

    def __init__(self, name: str | None = None, reduction: str = "sum_over_batch_size"):
        # dtype stays floatx (float32): Loss.__call__ then casts float16 predictions up.
        super().__init__(name=name, reduction=reduction)

    def per_image(self, y_true: Any, y_pred: Any) -> Any:
        raise NotImplementedError

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self.per_image(y_true, y_pred)


@keras.saving.register_keras_serializable(package="tfpneumo")
class BCELoss(_PerImageLoss):
    """Binary cross-entropy on probabilities, mean per image (:func:`bce_per_image`)."""

    def __init__(self, epsilon: float = EPSILON, name: str | None = "bce", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.epsilon = float(epsilon)

    def per_image(self, y_true: Any, y_pred: Any) -> Any:
        return bce_per_image(y_true, y_pred, self.epsilon)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tfpneumo")
class DiceLoss(_PerImageLoss):
    """Soft Dice loss per image (:func:`dice_loss_per_image`)."""

    def __init__(self, smooth: float = 1.0, name: str | None = "dice", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.smooth = float(smooth)

    def per_image(self, y_true: Any, y_pred: Any) -> Any:
        return dice_loss_per_image(y_true, y_pred, self.smooth)

    def get_config(self) -> dict:
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="tfpneumo")
class LogDiceLoss(_PerImageLoss):
    """``(-log(dice))^gamma`` per image (:func:`log_dice_loss_per_image`)."""

    def __init__(self, gamma: float = 0.3, smooth: float = 1.0, name: str | None = "log_dice",
                 **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.gamma = float(gamma)
        self.smooth = float(smooth)

    def per_image(self, y_true: Any, y_pred: Any) -> Any:
        return log_dice_loss_per_image(y_true, y_pred, self.gamma, self.smooth)

    def get_config(self) -> dict:
        return {**super().get_config(), "gamma": self.gamma, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="tfpneumo")
class FocalLoss(_PerImageLoss):
    """Binary focal loss on probabilities, mean per image (:func:`focal_per_image`)."""

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25, epsilon: float = EPSILON,
                 name: str | None = "focal", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.epsilon = float(epsilon)

    def per_image(self, y_true: Any, y_pred: Any) -> Any:
        return focal_per_image(y_true, y_pred, self.gamma, self.alpha, self.epsilon)

    def get_config(self) -> dict:
        return {**super().get_config(), "gamma": self.gamma, "alpha": self.alpha,
                "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tfpneumo")
class LovaszHingeLoss(_PerImageLoss):
    """Lovász hinge per image on *probabilities* (turned into logits with clipping)."""

    def __init__(self, epsilon: float = EPSILON, name: str | None = "lovasz", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.epsilon = float(epsilon)

    def per_image(self, y_true: Any, y_pred: Any) -> Any:
        return lovasz_hinge_prob_per_image(y_true, y_pred, self.epsilon)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tfpneumo")
class OHEMBCELoss(_PerImageLoss):
    """BCE over the hardest ``ceil(ratio * pixels)`` pixels per image (see ohem_bce_per_image)."""

    def __init__(self, ratio: float = 0.1, epsilon: float = EPSILON, name: str | None = "ohem_bce",
                 **kwargs: Any):
        if not 0.0 < ratio <= 1.0:
            raise LossError(f"ohem_bce: ratio must be in (0, 1], got {ratio}")
        super().__init__(name=name, **kwargs)
        self.ratio = float(ratio)
        self.epsilon = float(epsilon)

    def per_image(self, y_true: Any, y_pred: Any) -> Any:
        return ohem_bce_per_image(y_true, y_pred, self.ratio, self.epsilon)

    def get_config(self) -> dict:
        return {**super().get_config(), "ratio": self.ratio, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tfpneumo")
class ComboLoss(_PerImageLoss):
    """``bce_weight * BCE + dice_weight * Dice + focal_weight * focal + lovasz_weight * Lovász``."""

    def __init__(self, bce_weight: float = 3.0, dice_weight: float = 1.0,
                 focal_weight: float = 4.0, lovasz_weight: float = 0.0,
                 focal_gamma: float = 2.0, focal_alpha: float = 0.25, smooth: float = 1.0,
                 epsilon: float = EPSILON, name: str | None = "combo", **kwargs: Any):
        weights = (bce_weight, dice_weight, focal_weight, lovasz_weight)
        if min(weights) < 0 or sum(weights) <= 0:
            raise LossError(f"combo: weights must be >= 0 with one positive, got {weights}")
        super().__init__(name=name, **kwargs)
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.focal_weight = float(focal_weight)
        self.lovasz_weight = float(lovasz_weight)
        self.focal_gamma = float(focal_gamma)
        self.focal_alpha = float(focal_alpha)
        self.smooth = float(smooth)
        self.epsilon = float(epsilon)

    def per_image(self, y_true: Any, y_pred: Any) -> Any:
        return combo_per_image(y_true, y_pred, self.bce_weight, self.dice_weight,
                               self.focal_weight, self.lovasz_weight, self.focal_gamma,
                               self.focal_alpha, self.smooth, self.epsilon)

    def get_config(self) -> dict:
        return {**super().get_config(), "bce_weight": self.bce_weight,
                "dice_weight": self.dice_weight, "focal_weight": self.focal_weight,
                "lovasz_weight": self.lovasz_weight, "focal_gamma": self.focal_gamma,
                "focal_alpha": self.focal_alpha, "smooth": self.smooth, "epsilon": self.epsilon}


def mask_loss_function(kind: str, *, combo_bce: float = 3.0, combo_dice: float = 1.0,
                       combo_focal: float = 4.0, combo_lovasz: float = 0.0,
                       log_dice_gamma: float = 0.3, focal_gamma: float = 2.0,
                       focal_alpha: float = 0.25, ohem_ratio: float = 0.1, smooth: float = 1.0,
                       epsilon: float = EPSILON) -> Callable[[Any, Any], Any]:
    """The per-image function ``f(y_true, y_pred) -> (B,)`` for a ``loss.mask`` kind."""
    table: dict[str, Callable[[Any, Any], Any]] = {
        "bce": partial(bce_per_image, epsilon=epsilon),
        "dice": partial(dice_loss_per_image, smooth=smooth),
        "log_dice": partial(log_dice_loss_per_image, gamma=log_dice_gamma, smooth=smooth),
        "focal": partial(focal_per_image, gamma=focal_gamma, alpha=focal_alpha, epsilon=epsilon),
        "lovasz": partial(lovasz_hinge_prob_per_image, epsilon=epsilon),
        "ohem_bce": partial(ohem_bce_per_image, ratio=ohem_ratio, epsilon=epsilon),
        "combo": partial(combo_per_image, bce_weight=combo_bce, dice_weight=combo_dice,
                         focal_weight=combo_focal, lovasz_weight=combo_lovasz,
                         focal_gamma=focal_gamma, focal_alpha=focal_alpha, smooth=smooth,
                         epsilon=epsilon),
    }
    if kind not in table:
        raise LossError(f"mask loss {kind!r} is not one of {list(MASK_KINDS)}")
    return table[kind]


@keras.saving.register_keras_serializable(package="tfpneumo")
class MaskLoss(_PerImageLoss):
    """The training mask loss: a ``kind`` from :data:`MASK_KINDS`, optionally positives-only.

    With ``positives_only`` the loss is the mean over images whose truth mask is non-empty
    (2nd/4th place: the classifier head handles empty images); a batch without a positive
    gives 0 with a zero gradient, never NaN. ``call()`` returns
    ``l_i * pos_i * B_local * R / max(P_global, 1)`` per image, where ``P_global`` is the
    number of positive images summed over the ``R`` replicas; Keras' default reduction
    divides by ``B_local`` and by ``R`` (see :class:`_PerImageLoss`), so after the gradient
    all-reduce the loss is ``sum over positives / P_global`` over the global batch.
    Sample weights multiply the per-image terms; the divisor stays the positive count.
    Because of that scaling, ``reduction=None`` does not give raw per-image losses: use
    :func:`mask_loss_function` for those.
    """

    def __init__(self, kind: str = "combo", positives_only: bool = True, *,
                 combo_bce: float = 3.0, combo_dice: float = 1.0, combo_focal: float = 4.0,
                 combo_lovasz: float = 0.0, log_dice_gamma: float = 0.3,
                 focal_gamma: float = 2.0, focal_alpha: float = 0.25, ohem_ratio: float = 0.1,
                 smooth: float = 1.0, epsilon: float = EPSILON, name: str | None = "mask_loss",
                 **kwargs: Any):
        self._params = {
            "combo_bce": float(combo_bce), "combo_dice": float(combo_dice),
            "combo_focal": float(combo_focal), "combo_lovasz": float(combo_lovasz),
            "log_dice_gamma": float(log_dice_gamma), "focal_gamma": float(focal_gamma),
            "focal_alpha": float(focal_alpha), "ohem_ratio": float(ohem_ratio),
            "smooth": float(smooth), "epsilon": float(epsilon),
        }
        self._fn = mask_loss_function(kind, **self._params)
        if kind == "combo":
            weights = (combo_bce, combo_dice, combo_focal, combo_lovasz)
            if min(weights) < 0 or sum(weights) <= 0:
                raise LossError(f"combo: weights must be >= 0 with one positive, got {weights}")
        if not 0.0 < ohem_ratio <= 1.0:
            raise LossError(f"ohem_bce: ratio must be in (0, 1], got {ohem_ratio}")
        super().__init__(name=name, **kwargs)
        self.kind = kind
        self.positives_only = bool(positives_only)

    def per_image(self, y_true: Any, y_pred: Any) -> Any:
        losses = self._fn(y_true, y_pred)
        if not self.positives_only:
            return losses
        positive = positive_images(y_true)
        local_batch = ops.cast(ops.shape(losses)[0], "float32")
        num_positive, replicas = _global_sum(ops.sum(positive))
        scale = ops.stop_gradient(local_batch * replicas / ops.maximum(num_positive, 1.0))
        # where, not a product: an empty image's term must be 0 even if its loss were inf.
        return ops.where(positive > 0, losses * scale, ops.zeros_like(losses))

    def get_config(self) -> dict:
        return {**super().get_config(), "kind": self.kind,
                "positives_only": self.positives_only, **self._params}


def build_losses(cfg: LossConfig) -> tuple[dict[str, keras.losses.Loss], dict[str, float]]:
    """``(loss, loss_weights)`` for ``model.compile`` on a model with outputs mask and label.

    ``loss["mask"]`` is a :class:`MaskLoss` of kind ``cfg.mask``; ``loss["label"]`` is plain
    BCE on every image; the weights are ``cfg.mask_weight`` and ``cfg.label_weight``.
    """
    mask = MaskLoss(
        cfg.mask, positives_only=cfg.mask_positives_only, combo_bce=cfg.combo_bce,
        combo_dice=cfg.combo_dice, combo_focal=cfg.combo_focal, combo_lovasz=cfg.combo_lovasz,
        log_dice_gamma=cfg.log_dice_gamma, focal_gamma=cfg.focal_gamma,
        focal_alpha=cfg.focal_alpha, ohem_ratio=cfg.ohem_ratio, name="mask_loss")
    label = BCELoss(name="label_loss")
    return ({"mask": mask, "label": label},
            {"mask": float(cfg.mask_weight), "label": float(cfg.label_weight)})
