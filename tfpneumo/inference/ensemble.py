"""Prediction helpers shared by training (out-of-fold statistics), evaluation and submission."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

HIST_BINS = 256


def predict_batch(net: keras.Model, images, hflip: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
    """Mask and label probabilities for one batch, averaged with the horizontal flip (TTA).

    images (B, H, W, 3) float32 normalised -> mask (B, H, W, 1) float32, label (B,) float32.
    """
    out = net(images, training=False)
    mask, label = tf.cast(out["mask"], tf.float32), tf.cast(out["label"], tf.float32)
    if hflip:
        flipped = net(tf.reverse(images, axis=[2]), training=False)
        mask = 0.5 * (mask + tf.reverse(tf.cast(flipped["mask"], tf.float32), axis=[2]))
        label = 0.5 * (label + tf.cast(flipped["label"], tf.float32))
    return mask, tf.reshape(label, [-1])


def probability_histograms(probs, truth, bins: int = HIST_BINS) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-image histograms of the mask probability over all pixels and over truth pixels.

    probs (B, H, W, 1) float32 in [0, 1], truth (B, H, W, 1) 0/1 -> two (B, bins) int32.
    Bin ``b`` holds probabilities in ``[b / bins, (b + 1) / bins)`` (1.0 in the last bin).
    From these, any rule "pixel > t" is scored exactly for t on the bin edges, so out-of-fold
    predictions need no full-size probability maps.
    """
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


def out_of_fold_statistics(net: keras.Model, dataset, hflip: bool = True) -> dict[str, np.ndarray]:
    """Runs ``net`` over an eval dataset (elements with image, mask, label, image_id).

    Returns compact per-image arrays: ``image_id`` (N,) str, ``label_prob`` (N,) float32,
    ``has_mask`` (N,) int8, ``hist_all`` and ``hist_true`` (N, 256) int32, ``pixels`` (N,)
    int64. Memory is flat in image size: no probability map is kept.
    """

    @tf.function(reduce_retracing=True)
    def step(images, masks):
        probs, label = predict_batch(net, images, hflip)
        hist_all, hist_true = probability_histograms(probs, masks)
        return label, hist_all, hist_true

    ids, labels, has_mask, hists_all, hists_true = [], [], [], [], []
    for batch in dataset:
        label, hist_all, hist_true = step(batch["image"], batch["mask"])
        ids.extend(x.decode() for x in batch["image_id"].numpy())
        labels.append(label.numpy())
        has_mask.append(batch["label"].numpy().reshape(-1))
        hists_all.append(hist_all.numpy())
        hists_true.append(hist_true.numpy())
    if not ids:
        raise ValueError("the evaluation dataset is empty")
    hist_all = np.concatenate(hists_all)
    return {
        "image_id": np.array(ids),
        "label_prob": np.concatenate(labels).astype(np.float32),
        "has_mask": (np.concatenate(has_mask) > 0.5).astype(np.int8),
        "hist_all": hist_all.astype(np.int32),
        "hist_true": np.concatenate(hists_true).astype(np.int32),
        "pixels": hist_all.sum(axis=1).astype(np.int64),
    }


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


# ----------------------------------------------------------------------------- test-time inference

RULES = ("triplet", "label", "pixel")


def scaled_size(size: int, scale: float) -> int:
    """``size * scale`` rounded to the nearest multiple of 32 (at least 32): the UNet's input
    sides must be multiples of 32."""
    return max(32, int(round(size * scale / 32.0)) * 32)


def predict_tta(net: keras.Model, images, hflip: bool = True,
                scales: tuple[float, ...] = (1.0,)) -> tuple[tf.Tensor, tf.Tensor]:
    """Multi-scale (and horizontal-flip) test-time augmentation of one network.

    images (B, H, W, 3) float32 normalised, H and W multiples of 32 -> mask (B, H, W, 1)
    float32, label (B,) float32. For each scale ``s`` the batch is resized (bilinear) to
    ``scaled_size(H, s) x scaled_size(W, s)``, predicted (with its flip when ``hflip``) and the
    mask probabilities resized back to ``H x W``; the maps and the labels are averaged over
    the scales. ``scales=(1.0,)`` is exactly :func:`predict_batch`.
    """
    if not scales:
        raise ValueError("scales must hold at least one scale")
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    masks, labels = [], []
    for scale in scales:
        if scale == 1.0:
            mask, label = predict_batch(net, images, hflip)
        else:
            # Sides are multiples of 32 (rounded like scaled_size, which needs Python ints).
            target = [tf.maximum(32, tf.cast(tf.round(tf.cast(side, tf.float32) * scale / 32.0),
                                             tf.int32) * 32) for side in (height, width)]
            # antialias when shrinking: plain bilinear would alias the fine lung texture.
            resized = tf.image.resize(images, target, method="bilinear", antialias=scale < 1.0)
            mask, label = predict_batch(net, resized, hflip)
            mask = tf.clip_by_value(tf.image.resize(mask, [height, width], method="bilinear"),
                                    0.0, 1.0)
        masks.append(mask)
        labels.append(label)
    return tf.add_n(masks) / len(masks), tf.add_n(labels) / len(labels)


def ensemble_predictor(nets: list[keras.Model], hflip: bool = True,
                       scales: tuple[float, ...] = (1.0,)):
    """A compiled function ``images (B, H, W, 3) float32 -> (mask (B, H, W, 1), label (B,))``,
    both float32: the mean over ``nets`` of :func:`predict_tta`.

    Traced once for any batch and image size (the input signature leaves them unknown).
    """
    if not nets:
        raise ValueError("an ensemble needs at least one network")
    scales = tuple(float(s) for s in scales)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def run(images):
        masks, labels = [], []
        for net in nets:
            mask, label = predict_tta(net, images, hflip, scales)
            masks.append(mask)
            labels.append(label)
        return tf.add_n(masks) / len(nets), tf.add_n(labels) / len(nets)

    return run


def keep_prediction(prob: np.ndarray, label_prob: float, rule: str, *, bottom: float,
                    top: float | None = None, min_area: int = 0,
                    label_threshold: float | None = None) -> bool:
    """Whether an image gets a mask at all (the gate); its mask is then ``prob >= bottom``.

    prob (H, W) float32 mask probabilities, label_prob the classification head's probability.
    The rules of ``tfpneumo evaluate`` (areas are pixel counts of ``prob`` as given, so
    ``min_area`` is at its resolution; ``>=`` on pixels as the OOF histograms count them):

    ``triplet`` (1st place): keep when ``count(prob >= top) >= min_area``.
    ``label``: keep when ``label_prob > label_threshold`` and ``count(prob >= bottom) >=
    min_area``.
    ``pixel``: keep when ``count(prob >= bottom) >= min_area``.
    """
    if rule == "triplet":
        if top is None:
            raise ValueError("the triplet rule needs top")
        return bool(np.count_nonzero(prob >= top) >= min_area)
    if rule == "label":
        if label_threshold is None:
            raise ValueError("the label rule needs label_threshold")
        if not label_prob > label_threshold:
            return False
    elif rule != "pixel":
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
    return bool(np.count_nonzero(prob >= bottom) >= min_area)
