"""The fold ensemble at test time: loading the networks, TTA, merging, and one predictor for all.

``submit``, ``predict``, ``export`` and the out-of-fold statistics of training all predict
through :func:`predict_batch` (an image and its mirror in one forward) and
:func:`ensemble_tta` (every fold on a batch); :class:`Predictor` adds the images: DICOMs in,
probability maps at the prediction size and the original pixels out.

Merging (:data:`~tfpneumo.evaluation.rules.MERGES`): the members of an ensemble are its
folds x TTA scales x flips, and one map comes out of them, pixel by pixel (the label
probability alike):

mean
    their mean (the default; folds, scales and flips averaged in turn).
median
    their median (the mean of the two middle values for an even count).
geomean
    their geometric mean ``exp(mean(log(max(p, 1e-7))))``.
mask_median
    the seed pipeline's "median of the members' masks, each thresholded at the shared
    threshold": a pixel is on when at least half of the members have ``p >= t``. The merged
    map is the order statistic ``sorted(p)[M // 2]`` (M members), because ``sorted(p)[M // 2]
    >= t`` exactly when ``ceil(M / 2)`` members are ``>= t``, for every ``t`` at once: the
    rule's top, bottom and label thresholds apply to it unchanged. With two members (one
    network and its flip) it is their maximum, the union of the two masks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfpneumo import runs
from tfpneumo.config import Config
from tfpneumo.data.dicom import MAX_DICOM_MIB
from tfpneumo.data.manifest import find_cache_info
from tfpneumo.errors import TfpneumoError
from tfpneumo.evaluation.rules import check_merge
from tfpneumo.machine import BFLOAT16_FLAGS, bfloat16_emulated, cpu_info
from tfpneumo.models.saved import load_network

GEOMEAN_FLOOR = 1e-7  # log(0) would make one member's 0 the whole ensemble's 0


def merge_members(members, merge: str):
    """``members`` (M, ...) float32 stacked member maps (or labels) -> (...) float32, merged
    by ``merge`` (see the module docstring); ``mean`` here is the plain mean over M."""
    if merge == "mean":
        return tf.reduce_mean(members, axis=0)
    if merge == "geomean":
        return tf.exp(tf.reduce_mean(tf.math.log(tf.maximum(members, GEOMEAN_FLOOR)), axis=0))
    count = members.shape[0]
    if count == 2:  # one network and its flip: no sort (nor TopK in a converted graph)
        ordered = tf.stack([tf.minimum(members[0], members[1]), tf.maximum(members[0], members[1])])
    else:
        ordered = tf.sort(members, axis=0) if count > 1 else members
    if merge == "mask_median" or count % 2:
        return ordered[count // 2]
    if merge == "median":
        return 0.5 * (ordered[count // 2 - 1] + ordered[count // 2])
    raise ValueError(f"unknown merge {merge!r}")


def flip_members(net: keras.Model, images, hflip: bool = True) -> tuple[list, list]:
    """One forward of the batch and (with ``hflip``) its mirror, a batch of 2B: the masks
    (B, H, W, 1) and labels (B,), float32, of the image and of its mirror flipped back."""
    n = tf.shape(images)[0]
    out = net(tf.concat([images, tf.reverse(images, axis=[2])], axis=0) if hflip else images,
              training=False)
    mask = tf.cast(out["mask"], tf.float32)
    label = tf.reshape(tf.cast(out["label"], tf.float32), [-1])
    if not hflip:
        return [mask], [label]
    return [mask[:n], tf.reverse(mask[n:], axis=[2])], [label[:n], label[n:]]


def mean_of_flips(masks: list, labels: list) -> tuple[tf.Tensor, tf.Tensor]:
    """The mean of :func:`flip_members`' output, as :func:`predict_batch` returns it."""
    if len(masks) == 1:
        return masks[0], labels[0]
    return 0.5 * (masks[0] + masks[1]), 0.5 * (labels[0] + labels[1])


def predict_members(net: keras.Model, images, hflip: bool = True,
                    scales: tuple[float, ...] = (1.0,)) -> tuple[list, list]:
    """The TTA members of one network, unmerged: lists of masks (B, H, W, 1) and labels (B,),
    float32, one per scale and flip (image before its mirror), at the input size."""
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    masks, labels = [], []
    for scale in scales:
        batch = images if scale == 1.0 else _rescaled(images, height, width, scale)
        scale_masks, scale_labels = flip_members(net, batch, hflip)
        if scale != 1.0:
            scale_masks = [tf.clip_by_value(tf.image.resize(m, [height, width], method="bilinear"),
                                            0.0, 1.0) for m in scale_masks]
        masks += scale_masks
        labels += scale_labels
    return masks, labels


def _rescaled(images, height, width, scale: float):
    """The batch resized to sides ``scaled_size(side, scale)`` (tensors: rounded alike)."""
    target = [tf.maximum(32, tf.cast(tf.round(tf.cast(side, tf.float32) * scale / 32.0),
                                     tf.int32) * 32) for side in (height, width)]
    # antialias when shrinking: plain bilinear would alias the fine lung texture.
    return tf.image.resize(images, target, method="bilinear", antialias=scale < 1.0)


def predict_batch(net: keras.Model, images, hflip: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
    """Mask and label probabilities for one batch, averaged with the horizontal flip (TTA).

    images (B, H, W, 1) grey pixels 0..255 -> mask (B, H, W, 1) float32, label (B,) float32.
    The batch and its mirror go through one forward (2B images), not two: the same maps bit
    for bit, 0.99-1.06x on the 2-core CPU (issue 13; README, "Speed and progress").
    """
    return mean_of_flips(*flip_members(net, images, hflip))


def scaled_size(size: int, scale: float) -> int:
    """``size * scale`` rounded to the nearest multiple of 32 (at least 32): the UNet's input
    sides must be multiples of 32."""
    return max(32, int(round(size * scale / 32.0)) * 32)


def predict_tta(net: keras.Model, images, hflip: bool = True,
                scales: tuple[float, ...] = (1.0,)) -> tuple[tf.Tensor, tf.Tensor]:
    """Multi-scale (and horizontal-flip) test-time augmentation of one network.

    images (B, H, W, 1) grey pixels 0..255, H and W multiples of 32 -> mask (B, H, W, 1)
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
            mask, label = predict_batch(net, _rescaled(images, height, width, scale), hflip)
            mask = tf.clip_by_value(tf.image.resize(mask, [height, width], method="bilinear"),
                                    0.0, 1.0)
        masks.append(mask)
        labels.append(label)
    return tf.add_n(masks) / len(masks), tf.add_n(labels) / len(labels)


def ensemble_tta(nets: Sequence[keras.Model], images, hflip: bool = True,
                 scales: tuple[float, ...] = (1.0,),
                 merge: str = "mean") -> tuple[tf.Tensor, tf.Tensor]:
    """Every member of the fold ensemble on one batch (each fold before the next batch is
    decoded), merged by ``merge``: ``mean`` is the mean over ``nets`` of :func:`predict_tta`,
    the others merge all folds x scales x flips at once (:func:`merge_members`). ``submit``,
    ``predict`` (:func:`ensemble_predictor`) and ``export`` (inside its graph) all merge here."""
    if not nets:
        raise ValueError("an ensemble needs at least one network")
    check_merge(merge)
    if merge != "mean":
        masks, labels = [], []
        for net in nets:
            m, lab = predict_members(net, images, hflip, scales)
            masks += m
            labels += lab
        return merge_members(tf.stack(masks), merge), merge_members(tf.stack(labels), merge)
    masks, labels = [], []
    for net in nets:
        mask, label = predict_tta(net, images, hflip, scales)
        masks.append(mask)
        labels.append(label)
    return tf.add_n(masks) / len(nets), tf.add_n(labels) / len(nets)


def ensemble_predictor(nets: list[keras.Model], hflip: bool = True,
                       scales: tuple[float, ...] = (1.0,), merge: str = "mean"):
    """A compiled function ``images (B, H, W, 1) float32 grey pixels -> (mask (B, H, W, 1), label (B,))``,
    both float32: :func:`ensemble_tta` (merged by ``merge``) in one graph.

    Traced once for any batch and image size (the input signature leaves them unknown). No
    XLA: on this project's CPU it was slower and changed the maps (README, "Speed and
    progress").
    """
    if not nets:
        raise ValueError("an ensemble needs at least one network")
    scales = tuple(float(s) for s in scales)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
    def run(images):
        return ensemble_tta(nets, images, hflip, scales, merge)

    return run


# ----------------------------------------------------------------------------- predictor

@dataclass
class Prediction:
    """One image: ``prob`` (size, size) float32 mask probabilities at the prediction size,
    ``label_prob`` the image-level probability, ``original`` (H, W) uint8 DICOM pixels."""

    image_id: str
    prob: np.ndarray
    label_prob: float
    original: np.ndarray


@dataclass
class Predictor:
    """The fold ensemble of a run, ready to predict DICOMs at ``size`` px (see :func:`predictor`)."""

    files: list[Path]
    size: int
    batch_size: int
    hflip: bool
    scales: tuple[float, ...]
    clahe: bool  # as the cache the networks were trained on
    run: Any  # ensemble_predictor(...)
    max_dicom_mib: float = MAX_DICOM_MIB  # config data.max_dicom_mib
    nets: list[keras.Model] = field(default_factory=list)  # for predict --explain (Grad-CAM)
    merge: str = "mean"  # how the members' maps became one (the rule's; see MERGES)
    precision: str = "float32"  # of the networks' arithmetic (PRECISIONS)
    bfloat16_emulated: bool = False  # precision bfloat16 without hardware for it here

    def predict(self, items: Sequence[tuple[str, Path]]) -> Iterator[Prediction]:
        """Predictions for (id, DICOM path) items, in order; one batch in memory at a time
        (the next is decoded in a background thread). A bad DICOM raises naming it."""
        from tfpneumo.inference.images import image_batches

        for batch in image_batches(items, self.size, self.batch_size, self.clahe,
                                   self.max_dicom_mib):
            probs, labels = self.run(batch.images[..., None].astype(np.float32))  # grey pixels
            probs, labels = probs.numpy()[..., 0], labels.numpy()
            for i, image_id in enumerate(batch.ids):
                yield Prediction(image_id, probs[i], float(labels[i]), batch.originals[i])

    def describe(self) -> str:
        tta = "hflip" if self.hflip else "no flip"
        if self.scales != (1.0,):
            tta += f", scales {','.join(f'{s:g}' for s in self.scales)}"
        names = ", ".join(f"{p.parent.name}/{p.name}" for p in self.files)
        precision = "" if self.precision == "float32" else f", {self.precision}"
        if self.bfloat16_emulated:
            precision += (" (emulated: no GPU, and this CPU has none of "
                          f"{', '.join(BFLOAT16_FLAGS)}; float32 is likely faster)")
        return f"ensemble of {len(self.files)} fold(s) ({names}), {tta}, size {self.size}{precision}"


PRECISIONS = ("float32", "bfloat16")
# Layers whose outputs stay float32 in a bfloat16 network: the two sigmoids the rules read.
FLOAT32_OUTPUTS = ("mask", "label")


def in_bfloat16(net: keras.Model) -> keras.Model:
    """``net`` rebuilt with the mixed_bfloat16 policy on every layer but its output sigmoids
    (bfloat16 arithmetic, float32 weights, float32 probabilities), with its weights."""
    config = net.get_config()
    for layer in config["layers"]:
        if (layer["class_name"] != "InputLayer"  # its dtype is the input's, not a policy
                and layer["config"].get("name") not in FLOAT32_OUTPUTS):
            layer["config"]["dtype"] = "mixed_bfloat16"
    half = keras.Model.from_config(config)
    half.set_weights(net.get_weights())
    return half


def predictor(cfg: Config, *, folds: runs.FoldSpec = "all", weights: str = "auto",
              size: int = 1024, batch_size: int | None = None, hflip: bool = True,
              scales: Sequence[float] = (1.0,), workdir: Path = Path("."),
              merge: str = "mean", precision: str = "float32") -> Predictor:
    """Loads the run's fold ensemble, its members merged by ``merge``. ``batch_size`` None: the
    training batch scaled to ``size`` (same pixels per batch). ``precision`` bfloat16: the
    networks in mixed_bfloat16 (faster on CPUs with AMX or avx512_bf16 and on GPUs; the masks
    move at their edges, see the README). Bad options raise before any network is loaded."""
    check_options(size, batch_size, scales, precision)
    check_merge(merge)
    scales = tuple(float(s) for s in scales)
    batch_size = batch_size or max(1, int(cfg.data.batch_size * (cfg.data.image_size / size) ** 2))
    files = runs.ensemble_files(cfg.experiment, folds, weights, workdir)
    nets = [load_network(p) for p in files]
    emulated = False
    if precision == "bfloat16":
        nets = [in_bfloat16(net) for net in nets]
        emulated = bfloat16_emulated(cpu_info()[1], len(tf.config.list_physical_devices("GPU")))
    cache = find_cache_info(cfg.data.cache)
    clahe = cache.clahe if cache is not None else cfg.prepare.clahe
    return Predictor(files, size, batch_size, hflip, scales, clahe,
                     ensemble_predictor(nets, hflip=hflip, scales=scales, merge=merge),
                     cfg.data.max_dicom_mib, nets, merge, precision, emulated)


def check_options(size: int, batch_size: int | None, scales: Sequence[float],
                  precision: str = "float32") -> None:
    """One-line errors for a prediction size, batch size, TTA scales or precision that cannot
    work."""
    if precision not in PRECISIONS:
        raise TfpneumoError(f"--precision {precision}: must be one of {', '.join(PRECISIONS)}")
    if size < 32 or size % 32:
        raise TfpneumoError(f"--size {size}: must be a multiple of 32 (the UNet downsamples 5 "
                            "times), e.g. 512 or 1024")
    if batch_size is not None and batch_size < 1:
        raise TfpneumoError(f"--batch-size {batch_size}: must be >= 1")
    scales = tuple(float(s) for s in scales)
    if not scales or any(not float(s) > 0 for s in scales):
        raise TfpneumoError(f"--scales {','.join(map(str, scales))}: must be positive")


def untrained_note(cfg: Config, files: Sequence[Path]) -> str:
    """``"; note: folds 1,2 of the cache are not in the ensemble"`` or ``""``."""
    cache = find_cache_info(cfg.data.cache)
    if cache is None:
        return ""
    left = sorted(set(range(cache.folds)) - {runs.fold_of(p) for p in files})
    return f"; note: folds {','.join(map(str, left))} of the cache are not in the ensemble" if left else ""
