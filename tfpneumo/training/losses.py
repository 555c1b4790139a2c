"""Segmentation and classification losses as Keras ``Loss`` classes that compose like a recipe.

The public form of every loss is a registered ``keras.losses.Loss`` class (package
``"tfpneumo"``): :class:`BCELoss`, :class:`DiceLoss`, :class:`LogDiceLoss`, :class:`FocalLoss`,
:class:`LovaszHingeLoss`, :class:`OHEMBCELoss` (optionally per truth class and rescaled),
:class:`BoundaryLoss`. Calling one, ``BCELoss()(y_true, y_pred)``,
gives the mean over images; ``BCELoss().call(y_true, y_pred)`` gives the per-image vector
``(B,) float32`` (see :class:`_PerImageLoss` for why ``call()`` returns a vector).

Losses add, and multiply by a non-negative number, into a :class:`WeightedSum`, so the 1st
place combo is written as it is described: ``3 * BCELoss() + DiceLoss() + 4 * FocalLoss()``.
:class:`PositivesOnly` wraps any of them to average over images with a non-empty truth only,
and :func:`build_losses` turns a :class:`~tfpneumo.config.LossConfig` into ``model.compile``
arguments spelled that way.

Inputs are ``y_true`` 0/1 and ``y_pred`` of shape ``(B, H, W, 1)``: probabilities, or logits
with ``from_logits=True`` (every loss takes it); any shape ``(B, ...)`` works, the label
head's ``(B, 1)`` too. Training uses logits (:class:`tfpneumo.training.trainer.Trainer`): on
probabilities clipped to ``[EPSILON, 1 - EPSILON]`` a pixel whose logit has run past +-16
gets no gradient at all, so a mask output that saturates to "empty" can never come back;
from logits, ``log(sigmoid(z))`` is ``-softplus(-z)`` and its gradient never vanishes. The
per-image maths lives in the private ``_*`` functions below. Inputs are cast to float32
first and every reduction runs in float32: under mixed precision the model's predictions may
be float16/bfloat16, and a float16 sum over a 1024x1024 map overflows.

One module over ~500 lines on purpose: six losses share one base class, one logits/probability
helper and one reduction, and the recipes compose them; split, each would import the rest.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import keras
from keras import ops

from tfpneumo.config import LossConfig, MaskLoss
from tfpneumo.errors import TfpneumoError

EPSILON = 1e-7
"""Probabilities are clipped to ``[EPSILON, 1 - EPSILON]`` before a log (logit range +-16.1)."""

MASK_KINDS = typing.get_args(MaskLoss)
"""The values of ``LossConfig.mask`` that :func:`build_losses` knows."""


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


def _prob_and_logs(y_pred: Any, from_logits: bool, epsilon: float) -> tuple[Any, Any, Any]:
    """``(p, log p, log(1 - p))`` flattened to ``(B, N) float32``.

    From logits ``z``: ``sigmoid(z)``, ``-softplus(-z)``, ``-softplus(z)``, exact and with a
    gradient everywhere. From probabilities: clipped to ``[epsilon, 1 - epsilon]`` first.
    """
    x = _flat(y_pred)
    if from_logits:
        return ops.sigmoid(x), -ops.softplus(-x), -ops.softplus(x)
    p = _clip(x, epsilon)
    return p, ops.log(p), ops.log1p(-p)


def _bce_pixels(t: Any, y_pred: Any, from_logits: bool, epsilon: float) -> Any:
    """Per-pixel binary cross-entropy ``(B, N) float32``."""
    _, log_p, log_q = _prob_and_logs(y_pred, from_logits, epsilon)
    return -(t * log_p + (1.0 - t) * log_q)


def _prob_to_logit(p: Any, epsilon: float) -> Any:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[epsilon, 1 - epsilon]``; float32 out."""
    p = _clip(ops.cast(p, "float32"), epsilon)
    return ops.log(p) - ops.log1p(-p)


def ohem_k(num_pixels: int, ratio: float) -> int:
    """Pixels kept per image by OHEM: ``ceil(ratio * num_pixels)`` clamped to ``[1, N]``.

    A 1e-9 slack keeps float noise (``0.1 * 30 = 3.0000000000000004``) from adding a pixel.
    """
    return min(num_pixels, max(1, math.ceil(ratio * num_pixels - 1e-9)))


def _positive_images(y_true: Any) -> Any:
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


# ----------------------------------------------------------------------------- per-image maths
# Each takes (B, ...) tensors and returns the per-image loss (B,) float32.

def _bce(y_true: Any, y_pred: Any, epsilon: float, from_logits: bool = False) -> Any:
    """Mean pixel BCE per image."""
    return ops.mean(_bce_pixels(_flat(y_true), y_pred, from_logits, epsilon), axis=-1)


def _dice(y_true: Any, y_pred: Any, smooth: float, from_logits: bool = False) -> Any:
    """Soft Dice coefficient ``(2 sum(p t) + s) / (sum(p) + sum(t) + s)`` per image."""
    t, p = _flat(y_true), _flat(y_pred)
    if from_logits:
        p = ops.sigmoid(p)
    intersection = ops.sum(p * t, axis=-1)
    total = ops.sum(p, axis=-1) + ops.sum(t, axis=-1)
    return (2.0 * intersection + smooth) / (total + smooth)


def _batch_dice(y_true: Any, y_pred: Any, smooth: float, from_logits: bool = False) -> Any:
    """One soft Dice over the whole batch as a single volume, repeated per image: ``(B,)``.

    ``(2 sum(p t) + s) / (sum(p) + sum(t) + s)`` with the sums over every pixel of every image
    (sneddy's ``soft_dice_loss(per_image=False)``, amirassov's ``soft_dice_loss``). Repeating
    the batch value for each image makes Keras' mean over the batch equal to it, with the
    gradient of the batch Dice. Over the local batch: each replica of a tf.distribute run,
    and each micro-batch of an accumulated step, computes its own.
    """
    t, p = _flat(y_true), _flat(y_pred)
    if from_logits:
        p = ops.sigmoid(p)
    intersection = ops.sum(p * t)
    total = ops.sum(p) + ops.sum(t)
    dice = (2.0 * intersection + smooth) / (total + smooth)
    return dice * ops.ones_like(t[:, 0])


def _log_dice(y_true: Any, y_pred: Any, gamma: float, smooth: float,
              from_logits: bool = False) -> Any:
    """``(-log(dice))^gamma`` per image; exactly 0 (zero gradient) when dice is 1.

    ``x^gamma`` has an infinite slope at 0 for ``gamma < 1``, so the perfect case is
    special-cased with ``where`` on a safe operand instead of adding an epsilon (which would
    make a perfect prediction cost ``eps^gamma``, 0.008 for 1e-7 and gamma 0.3).
    """
    x = ops.maximum(-ops.log(_dice(y_true, y_pred, smooth, from_logits)), 0.0)
    positive = x > 0.0
    safe = ops.where(positive, x, ops.ones_like(x))
    return ops.where(positive, ops.power(safe, gamma), ops.zeros_like(x))


def _focal(y_true: Any, y_pred: Any, gamma: float, alpha: float | None, epsilon: float,
           from_logits: bool = False) -> Any:
    """Binary focal loss (Lin et al. 2017), mean over pixels per image.

    ``-alpha t (1-p)^gamma log(p) - (1-alpha) (1-t) p^gamma log(1-p)``: alpha weighs the
    positive pixels, as in RetinaNet. ``alpha=None``: no weighting, ``-(1-p_t)^gamma
    log(p_t)`` on every pixel (sneddy's ``FocalLoss2d``, whose batch mean over pixels equals
    the mean over images of this per-image mean: every image has the same pixel count).
    """
    t = _flat(y_true)
    p, log_p, log_q = _prob_and_logs(y_pred, from_logits, epsilon)
    w_pos, w_neg = (1.0, 1.0) if alpha is None else (alpha, 1.0 - alpha)
    pos = w_pos * t * ops.power(1.0 - p, gamma) * log_p
    neg = w_neg * (1.0 - t) * ops.power(p, gamma) * log_q
    return -ops.mean(pos + neg, axis=-1)


def _lovasz_grad(gt_sorted: Any) -> Any:
    """Gradient of the Lovász extension of the Jaccard loss, ``(B, N)`` sorted truths."""
    gts = ops.sum(gt_sorted, axis=-1, keepdims=True)
    intersection = gts - ops.cumsum(gt_sorted, axis=-1)
    union = gts + ops.cumsum(1.0 - gt_sorted, axis=-1)  # >= 1 everywhere: no 0/0
    jaccard = 1.0 - intersection / union
    previous = ops.concatenate([ops.zeros_like(jaccard[:, :1]), jaccard[:, :-1]], axis=-1)
    return jaccard - previous


def _lovasz_hinge(y_true: Any, logits: Any) -> Any:
    """Lovász hinge per image (Berman et al. 2018) on logits.

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


def _ohem_bce(y_true: Any, y_pred: Any, ratio: float, epsilon: float,
              from_logits: bool = False) -> Any:
    """Mean BCE over the ``ohem_k(N, ratio)`` hardest pixels of each image."""
    pixels = _bce_pixels(_flat(y_true), y_pred, from_logits, epsilon)
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


def _ohem_bce_per_class(y_true: Any, y_pred: Any, ratio: float, epsilon: float,
                        from_logits: bool = False) -> Any:
    """OHEM-BCE on the truth's positive and on its negative pixels separately, per image.

    Class ``c`` (``n_c`` pixels) keeps its ``k_c = min(n_c, max(ceil(ratio n_c), min_keep))``
    hardest pixels, ``min_keep = min(n_pos, n_neg)``: the minority class is kept whole and the
    majority keeps at least as many hard pixels as the minority has. The loss is the mean BCE
    over the ``k_pos + k_neg`` kept pixels. Counts are per image (the seed counted over its
    batch): every loss here is per image, so that :class:`PositivesOnly` and the global-batch
    normalisation give the same result on one device and on N (a batch count would be each
    replica's own share). An empty truth has ``min_keep = 0``: plain OHEM.
    """
    t = _flat(y_true)
    pixels = _bce_pixels(t, y_pred, from_logits, epsilon)
    positive = t > 0.5
    n_pos = ops.sum(ops.cast(positive, "float32"), axis=-1)
    n_neg = ops.cast(ops.shape(pixels)[-1], "float32") - n_pos
    min_keep = ops.minimum(n_pos, n_neg)
    place = ops.cast(ops.arange(ops.shape(pixels)[-1]), "float32")
    total, kept = 0.0, 0.0
    for member, count in ((positive, n_pos), (ops.logical_not(positive), n_neg)):
        k = ops.minimum(count, ops.maximum(ops.ceil(ratio * count - 1e-6), min_keep))
        # the other class's pixels sort last (BCE >= 0 > -1) and only the first k are kept
        ranked = -ops.sort(-ops.where(member, pixels, -1.0), axis=-1)
        total = total + ops.sum(ops.where(place[None, :] < k[:, None], ranked, 0.0), axis=-1)
        kept = kept + k
    return total / ops.maximum(kept, 1.0)


def _rescaled(ohem: Any, plain: Any) -> Any:
    """``ohem`` times the constant ``plain / ohem``: the value of the plain loss, the gradient of
    OHEM scaled by that factor (the hard pixels' gradient at the plain loss's magnitude)."""
    positive = ohem > 0.0
    factor = ops.where(positive, plain / ops.where(positive, ohem, 1.0), 0.0)
    return ohem * ops.stop_gradient(factor)


# ----------------------------------------------------------------------------- boundary loss

_FAR = 1e6  # "no such pixel in this row/image"; squared (1e12) it stays finite in float32


def _shifted(x: Any, offset: Any, axis: int, fill: float) -> Any:
    """``x`` moved by ``offset`` (a scalar tensor, may be negative) along ``axis``: out[i] =
    x[i - offset], ``fill`` where ``i - offset`` is outside. A gather, not a pad: the offset
    changes inside a while loop, and XLA needs static pad widths."""
    size = ops.shape(x)[axis]
    source = ops.arange(size) - ops.cast(offset, "int32")
    inside = (source >= 0) & (source < size)
    moved = ops.take(x, ops.clip(source, 0, size - 1), axis=axis)
    shape = [1, 1, 1]
    shape[axis] = -1
    return ops.where(ops.reshape(inside, shape), moved, fill)


def squared_distance_to(member: Any) -> Any:
    """Exact squared Euclidean distance from each pixel to the nearest ``True`` pixel of its
    image, ``(B, H, W)`` bool -> float32 (0 on members; >= 1e12 where the image has none).

    Separable (as scipy's ``distance_transform_edt``): along W, the nearest member of the row
    from a prefix max / suffix min of member indices (log2 W doubling steps); along H,
    ``min_d f(y + d) + d^2`` over offsets d = 1, 2, ..., stopped once ``d^2`` exceeds every
    distance found (no farther row can give a shorter one). In TensorFlow ops with while loops,
    so it runs inside the compiled, XLA and distributed train step.
    """
    member = ops.convert_to_tensor(member)
    width = ops.shape(member)[2]
    index = ops.cast(ops.arange(width), "float32")[None, None, :]
    left = ops.where(member, index, -_FAR)   # nearest member at or left of each pixel
    right = ops.where(member, index, _FAR)   # ... at or right of it

    def scan_step(step, left, right):
        left = ops.maximum(left, _shifted(left, step, 2, -_FAR))
        right = ops.minimum(right, _shifted(right, -step, 2, _FAR))
        return step * 2, left, right

    _, left, right = ops.while_loop(lambda step, *_: step < width, scan_step,
                                    (ops.convert_to_tensor(1, "int32"), left, right))
    f = ops.square(ops.minimum(index - left, right - index))

    height = ops.shape(member)[1]
    has = ops.any(member, axis=(1, 2), keepdims=True)

    def cond(d, g):
        reachable = ops.max(ops.where(has, g, 0.0))
        return (d < height) & (ops.cast(d * d, "float32") < reachable)

    def body(d, g):
        d2 = ops.cast(d * d, "float32")
        g = ops.minimum(g, _shifted(f, d, 1, _FAR * _FAR) + d2)
        g = ops.minimum(g, _shifted(f, -d, 1, _FAR * _FAR) + d2)
        return d + 1, g

    _, g = ops.while_loop(cond, body, (ops.convert_to_tensor(1, "int32"), f))
    return g


def signed_distance(y_true: Any) -> Any:
    """Kervadec et al.'s level set of the truth, ``(B, H, W[, 1])`` 0/1 -> ``(B, H, W)`` float32.

    Outside the mask the distance to the nearest mask pixel; inside, minus (the distance to
    the nearest background pixel - 1), so the mask's border pixels are 0 (their
    ``one_hot2dist``: ``edt(neg) * neg - (edt(pos) - 1) * pos``). 0 on an image that is all
    background or all mask: it has no boundary.
    """
    t = ops.cast(y_true, "float32")
    if len(t.shape) == 4:
        t = t[..., 0]
    inside = t > 0.5
    both = ops.concatenate([inside, ops.logical_not(inside)], axis=0)
    distances = ops.sqrt(squared_distance_to(both))
    batch = ops.shape(t)[0]
    to_mask, to_background = distances[:batch], distances[batch:]
    phi = ops.where(inside, 1.0 - to_background, to_mask)
    has_boundary = ops.any(inside, axis=(1, 2)) & ops.any(ops.logical_not(inside), axis=(1, 2))
    return ops.where(has_boundary[:, None, None], phi, 0.0)


def _boundary(y_true: Any, y_pred: Any, from_logits: bool = False) -> Any:
    """Mean over pixels of ``p * signed_distance(truth)`` per image (negative when p sits inside)."""
    phi = ops.stop_gradient(signed_distance(y_true))
    p = _flat(y_pred)
    if from_logits:
        p = ops.sigmoid(p)
    return ops.mean(p * _flat(phi), axis=-1)


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

    ``a + b`` and ``w * a`` (``w`` a number) give a :class:`WeightedSum`; only these
    per-image losses compose, because a Keras built-in's ``call()`` returns per-pixel
    values that would broadcast against a ``(B,)`` vector instead of adding to it.
    """

    # numpy scalars (a weight read from an array) would otherwise turn ``np.float32(3) * loss``
    # into a 0-d object array; None makes numpy defer to __rmul__.
    __array_ufunc__ = None

    def __init__(self, name: str | None = None, reduction: str = "sum_over_batch_size",
                 from_logits: bool = False):
        # dtype stays floatx (float32): Loss.__call__ then casts float16 predictions up.
        super().__init__(name=name, reduction=reduction)
        self.from_logits = bool(from_logits)

    def get_config(self) -> dict:
        return {**super().get_config(), "from_logits": self.from_logits}

    def __add__(self, other: Any) -> WeightedSum:
        if not isinstance(other, _PerImageLoss):
            return NotImplemented
        return WeightedSum([(1.0, self), (1.0, other)])

    def __radd__(self, other: Any) -> _PerImageLoss:
        # 0 + loss is loss, so that the builtin sum() of a list of losses works.
        if isinstance(other, numbers.Number) and other == 0:
            return self
        return NotImplemented

    def __mul__(self, weight: Any) -> WeightedSum:
        if not isinstance(weight, numbers.Real):
            return NotImplemented
        return WeightedSum([(weight, self)])

    __rmul__ = __mul__


@keras.saving.register_keras_serializable(package="tfpneumo")
class BCELoss(_PerImageLoss):
    """Binary cross-entropy, mean over the pixels of each image."""

    def __init__(self, epsilon: float = EPSILON, name: str | None = "bce", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.epsilon = float(epsilon)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return _bce(y_true, y_pred, self.epsilon, self.from_logits)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tfpneumo")
class DiceLoss(_PerImageLoss):
    """Soft Dice loss ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` per image.

    ``per_image=False``: one Dice over the whole (local) batch as a single volume, the same
    value for every image (see :func:`_batch_dice`); do not wrap it in :class:`PositivesOnly`.
    """

    def __init__(self, smooth: float = 1.0, per_image: bool = True, name: str | None = "dice",
                 **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.smooth = float(smooth)
        self.per_image = bool(per_image)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        dice = _dice if self.per_image else _batch_dice
        return 1.0 - dice(y_true, y_pred, self.smooth, self.from_logits)

    def get_config(self) -> dict:
        return {**super().get_config(), "smooth": self.smooth, "per_image": self.per_image}


@keras.saving.register_keras_serializable(package="tfpneumo")
class LogDiceLoss(_PerImageLoss):
    """``(-log(dice))^gamma`` per image; 0 with a zero gradient for a perfect prediction."""

    def __init__(self, gamma: float = 0.3, smooth: float = 1.0, name: str | None = "log_dice",
                 **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.gamma = float(gamma)
        self.smooth = float(smooth)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return _log_dice(y_true, y_pred, self.gamma, self.smooth, self.from_logits)

    def get_config(self) -> dict:
        return {**super().get_config(), "gamma": self.gamma, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="tfpneumo")
class FocalLoss(_PerImageLoss):
    """Binary focal loss, mean over the pixels of each image.

    ``-alpha t (1-p)^gamma log(p) - (1-alpha) (1-t) p^gamma log(1-p)`` (RetinaNet's alpha);
    ``alpha=None``: ``-(1-p_t)^gamma log(p_t)``, no class weighting (the 1st place's focal).
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25, epsilon: float = EPSILON,
                 name: str | None = "focal", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.gamma = float(gamma)
        self.alpha = None if alpha is None else float(alpha)
        self.epsilon = float(epsilon)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return _focal(y_true, y_pred, self.gamma, self.alpha, self.epsilon, self.from_logits)

    def get_config(self) -> dict:
        return {**super().get_config(), "gamma": self.gamma, "alpha": self.alpha,
                "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tfpneumo")
class LovaszHingeLoss(_PerImageLoss):
    """Lovász hinge per image (Berman et al. 2018).

    Probabilities are turned into logits (clipped to ``[epsilon, 1 - epsilon]`` first);
    ``from_logits=True`` takes logits as they are. An image with empty truth costs
    ``relu(1 + max(logits))``.
    """

    def __init__(self, from_logits: bool = False, epsilon: float = EPSILON,
                 name: str | None = "lovasz", **kwargs: Any):
        super().__init__(name=name, from_logits=from_logits, **kwargs)
        self.epsilon = float(epsilon)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        logits = y_pred if self.from_logits else _prob_to_logit(y_pred, self.epsilon)
        return _lovasz_hinge(y_true, logits)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tfpneumo")
class OHEMBCELoss(_PerImageLoss):
    """BCE over the hardest :func:`ohem_k` ``(pixels, ratio)`` pixels of each image.

    ``per_class``: over the hardest pixels of each truth class (:func:`_ohem_bce_per_class`).
    ``rescale``: times the constant ``plain BCE / OHEM`` of the image (:func:`_rescaled`).
    """

    def __init__(self, ratio: float = 0.1, epsilon: float = EPSILON, name: str | None = "ohem_bce",
                 per_class: bool = False, rescale: bool = False, **kwargs: Any):
        if not 0.0 < ratio <= 1.0:
            raise LossError(f"ohem_bce: ratio must be in (0, 1], got {ratio}")
        super().__init__(name=name, **kwargs)
        self.ratio = float(ratio)
        self.epsilon = float(epsilon)
        self.per_class = bool(per_class)
        self.rescale = bool(rescale)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        ohem = _ohem_bce_per_class if self.per_class else _ohem_bce
        value = ohem(y_true, y_pred, self.ratio, self.epsilon, self.from_logits)
        if self.rescale:
            value = _rescaled(value, _bce(y_true, y_pred, self.epsilon, self.from_logits))
        return value

    def get_config(self) -> dict:
        return {**super().get_config(), "ratio": self.ratio, "epsilon": self.epsilon,
                "per_class": self.per_class, "rescale": self.rescale}


@keras.saving.register_keras_serializable(package="tfpneumo")
class BoundaryLoss(_PerImageLoss):
    """Boundary loss (Kervadec et al., MIDL 2019): mean of ``p * signed_distance(truth)`` per
    image, the distance map computed from the truth in the loss (:func:`signed_distance`).

    Negative when the prediction lies inside the truth (minimum: -sum of the inside distances
    / pixels); 0 for an image without a boundary. Meant to be added to a region loss
    (``loss.boundary_weight``), never alone: alone it is minimised by predicting the inside
    only, which an empty prediction on a tiny mask nearly does.
    """

    def __init__(self, name: str | None = "boundary", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        # The share of the loss in effect, set at each epoch's start by the training loop's
        # BoundaryRamp callback (1.0 when nothing sets it): a variable, so that the compiled
        # step reads the new value without retracing.
        self.ramp = keras.Variable(1.0, trainable=False, name="boundary_ramp")

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return _boundary(y_true, y_pred, self.from_logits) * ops.cast(self.ramp, y_pred.dtype)


@keras.saving.register_keras_serializable(package="tfpneumo")
class WeightedSum(_PerImageLoss):
    """``sum(w_i * loss_i)`` per image, from ``[(w_1, loss_1), ...]``; what ``+`` and ``*`` build.

    Terms that are themselves weighted sums are flattened, so ``3 * BCELoss() + DiceLoss()
    + 4 * FocalLoss()`` has the three terms ``(3, bce), (1, dice), (4, focal)`` whichever way
    it is bracketed. Weights must be finite and ``>= 0`` (a negative weight would reward a
    loss), and every term is computed: leave a zero-weight term out rather than pay for it
    (the Lovász sort is the expensive one). Only this sum's ``reduction`` applies; the terms'
    own are not used.
    """

    def __init__(self, terms: Sequence[tuple[float, _PerImageLoss]],
                 name: str | None = "weighted_sum", **kwargs: Any):
        flat: list[tuple[float, _PerImageLoss]] = []
        for weight, loss in terms:
            if not isinstance(loss, _PerImageLoss):
                raise LossError(f"weighted sum: {loss!r} is not a tfpneumo per-image loss")
            if not (math.isfinite(weight) and weight >= 0):
                raise LossError(f"weighted sum: weights must be finite and >= 0, got {weight}")
            if isinstance(loss, WeightedSum):
                flat.extend((float(weight) * w, inner) for w, inner in loss.terms)
            else:
                flat.append((float(weight), loss))
        if not flat:
            raise LossError("weighted sum: no terms")
        kinds = {loss.from_logits for _, loss in flat}
        if len(kinds) > 1:
            raise LossError("weighted sum: some terms take logits and others probabilities")
        kwargs.pop("from_logits", None)  # the terms' own, not a setting of the sum
        super().__init__(name=name, from_logits=kinds.pop(), **kwargs)
        self.terms = flat

    def call(self, y_true: Any, y_pred: Any) -> Any:
        values = [weight * loss.call(y_true, y_pred) for weight, loss in self.terms]
        return sum(values[1:], values[0])

    def get_config(self) -> dict:
        return {**super().get_config(),
                "terms": [{"weight": weight, "loss": keras.saving.serialize_keras_object(loss)}
                          for weight, loss in self.terms]}

    @classmethod
    def from_config(cls, config: dict) -> WeightedSum:
        config = dict(config)
        terms = [(term["weight"], keras.saving.deserialize_keras_object(term["loss"]))
                 for term in config.pop("terms")]
        return cls(terms, **config)


def _has_positives_only(loss: _PerImageLoss) -> bool:
    if isinstance(loss, WeightedSum):
        return any(_has_positives_only(term) for _, term in loss.terms)
    return isinstance(loss, PositivesOnly)


# (positive images of the whole local batch, micro-batches) while Trainer.train_step computes
# the loss of one micro-batch of an accumulated step; None otherwise. A context variable:
# under MirroredStrategy each replica traces its step in a thread of its own.
_WHOLE_BATCH: contextvars.ContextVar = contextvars.ContextVar("tfpneumo_whole_batch", default=None)


@contextlib.contextmanager
def accumulating(y_true_mask: Any, micro_batches: int) -> Iterator[None]:
    """While active, :class:`PositivesOnly` normalises each micro-batch's loss by the positive
    images of the whole batch ``y_true_mask`` (B, ...) (over all replicas), scaled so that the
    mean of the ``micro_batches`` micro-batch gradients equals the whole batch's gradient."""
    token = _WHOLE_BATCH.set((ops.sum(_positive_images(y_true_mask)), micro_batches))
    try:
        yield
    finally:
        _WHOLE_BATCH.reset(token)


@keras.saving.register_keras_serializable(package="tfpneumo")
class PositivesOnly(_PerImageLoss):
    """``loss`` averaged over the images whose truth mask is non-empty.

    2nd/4th place trained the mask on positive images only (the classifier head handles
    empty ones). A batch without a positive gives 0 with a zero gradient, never NaN.
    ``call()`` returns ``l_i * pos_i * B_local * R / max(P_global, 1)`` per image, where
    ``P_global`` is the number of positive images summed over the ``R`` replicas; Keras'
    default reduction divides by ``B_local`` and by ``R`` (see :class:`_PerImageLoss`), so
    after the gradient all-reduce the loss is ``sum over positives / P_global`` over the
    global batch. Sample weights multiply the per-image terms; the divisor stays the
    positive count. Under gradient accumulation (:func:`accumulating`) ``P_global`` is the
    whole batch's, so an accumulated step equals the step on the whole batch. Because of that
    scaling, ``reduction=None`` does not give raw per-image
    losses: ``.loss.call()`` does. For the same reason ``loss`` may not contain another
    :class:`PositivesOnly` (its terms would be scaled twice).
    """

    def __init__(self, loss: _PerImageLoss, name: str | None = "positives_only", **kwargs: Any):
        if not isinstance(loss, _PerImageLoss):
            raise LossError(f"positives only: {loss!r} is not a tfpneumo per-image loss")
        if _has_positives_only(loss):
            raise LossError("positives only: the wrapped loss already averages over positives")
        kwargs.pop("from_logits", None)  # the wrapped loss's own
        super().__init__(name=name, from_logits=loss.from_logits, **kwargs)
        self.loss = loss

    def call(self, y_true: Any, y_pred: Any) -> Any:
        losses = self.loss.call(y_true, y_pred)
        positive = _positive_images(y_true)
        local_batch = ops.cast(ops.shape(losses)[0], "float32")
        whole = _WHOLE_BATCH.get()
        if whole is None:
            num_positive, replicas = _global_sum(ops.sum(positive))
            micro_batches = 1.0
        else:  # a micro-batch of an accumulated step: divide by the whole batch's positives
            num_positive, replicas = _global_sum(whole[0])
            micro_batches = float(whole[1])
        scale = ops.stop_gradient(local_batch * replicas * micro_batches
                                  / ops.maximum(num_positive, 1.0))
        # where, not a product: an empty image's term must be 0 even if its loss were inf.
        return ops.where(positive > 0, losses * scale, ops.zeros_like(losses))

    def get_config(self) -> dict:
        return {**super().get_config(), "loss": keras.saving.serialize_keras_object(self.loss)}

    @classmethod
    def from_config(cls, config: dict) -> PositivesOnly:
        config = dict(config)
        return cls(keras.saving.deserialize_keras_object(config.pop("loss")), **config)


# ----------------------------------------------------------------------------- from the config

def _mask_loss(cfg: LossConfig, from_logits: bool) -> _PerImageLoss:
    """The ``cfg.mask`` loss over all images (before any positives-only wrapping)."""
    z = {"from_logits": from_logits}
    focal = FocalLoss(gamma=cfg.focal_gamma, alpha=cfg.focal_alpha, **z)
    dice = DiceLoss(smooth=cfg.dice_smooth, per_image=cfg.dice_per_image, **z)
    if cfg.mask == "combo":
        # With the defaults this is 3 * BCELoss() + DiceLoss() + 4 * FocalLoss().
        terms = [weight * loss for weight, loss in ((cfg.combo_bce, BCELoss(**z)),
                                                   (cfg.combo_dice, dice),
                                                   (cfg.combo_focal, focal),
                                                   (cfg.combo_lovasz, LovaszHingeLoss(**z)))
                 if weight != 0]
        if not terms:
            raise LossError("combo loss: every weight is 0")
        if cfg.reduce == "mean":  # the seed's "mean rather than sum of BCE and Dice"
            return (1.0 / len(terms)) * sum(terms)
        return sum(terms)
    single = {
        "bce": lambda: BCELoss(**z),
        "dice": lambda: dice,
        "log_dice": lambda: LogDiceLoss(gamma=cfg.log_dice_gamma, **z),
        "focal": lambda: focal,
        "lovasz": lambda: LovaszHingeLoss(**z),
        "ohem_bce": lambda: OHEMBCELoss(ratio=cfg.ohem_ratio, per_class=cfg.ohem_per_class,
                                        rescale=cfg.ohem_rescale, **z),
    }
    if cfg.mask not in single:
        raise LossError(f"mask loss {cfg.mask!r} is not one of {list(MASK_KINDS)}")
    return single[cfg.mask]()


def build_losses(cfg: LossConfig, from_logits: bool = True,
                 ) -> tuple[dict[str, keras.losses.Loss], dict[str, float]]:
    """``(loss, loss_weights)`` for ``model.compile`` on a model with outputs mask and label.

    ``from_logits`` (the default): every loss takes logits, as
    :class:`~tfpneumo.training.trainer.Trainer` gives them; False for a plain Keras model
    whose outputs are probabilities.

    ``loss["mask"]`` is the ``cfg.mask`` loss (a combo is a :class:`WeightedSum` without its
    zero-weight terms, divided by their number when ``cfg.reduce`` is mean), plus
    ``cfg.boundary_weight`` times :class:`BoundaryLoss` when that is > 0 (ramped in over
    ``cfg.boundary_ramp_epochs`` by :func:`boundary_ramp` and the training loop), wrapped in
    :class:`PositivesOnly` when ``cfg.mask_positives_only``;
    ``loss["label"]`` is plain BCE on every image; the weights are ``cfg.mask_weight`` and
    ``cfg.label_weight``.
    """
    mask = _mask_loss(cfg, from_logits)
    if cfg.boundary_weight > 0:
        mask = mask + cfg.boundary_weight * BoundaryLoss(from_logits=from_logits)
    if cfg.mask_positives_only and not cfg.dice_per_image and cfg.mask in ("dice", "combo"):
        raise LossError("a Dice over the whole batch (dice_per_image false) cannot be averaged "
                        "over positive images (mask_positives_only true)")
    if cfg.mask_positives_only:
        mask = PositivesOnly(mask, name="mask_loss")
    label = BCELoss(name="label_loss", from_logits=from_logits)
    return ({"mask": mask, "label": label},
            {"mask": float(cfg.mask_weight), "label": float(cfg.label_weight)})


def boundary_losses(loss: Any) -> list[BoundaryLoss]:
    """The :class:`BoundaryLoss` terms inside a (wrapped, weighted) loss."""
    found, stack = [], [loss]
    while stack:
        item = stack.pop()
        if isinstance(item, BoundaryLoss):
            found.append(item)
        if isinstance(item, PositivesOnly):
            stack.append(item.loss)
        stack.extend(term for _, term in getattr(item, "terms", []))
    return found


def boundary_ramp(epoch: int, ramp_epochs: int) -> float:
    """The share of ``loss.boundary_weight`` in effect in epoch ``epoch`` (0-based): rising
    linearly to 1 over the first ``ramp_epochs`` epochs (1/ramp in the first), 1 after; 1
    when ``ramp_epochs`` is 0. Kervadec et al. raise the boundary term's weight during
    training in the same way, so that the region loss shapes the mask first."""
    if ramp_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / ramp_epochs)
