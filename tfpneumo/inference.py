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


def dice_from_histograms(stats: dict[str, np.ndarray], threshold: float) -> float:
    """Mean per-image Dice of the mask ``prob > threshold`` from the OOF histograms.

    Exact for thresholds on the bin edges (multiples of 1/256); 1.0 for an image where both
    prediction and truth are empty, as in the competition metric.
    """
    hist_all, hist_true = stats["hist_all"], stats["hist_true"]
    first = int(np.ceil(threshold * hist_all.shape[1] - 1e-9))
    pred = hist_all[:, first:].sum(axis=1)
    inter = hist_true[:, first:].sum(axis=1)
    denom = pred + hist_true.sum(axis=1)
    dice = np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1))
    return float(dice.mean())
