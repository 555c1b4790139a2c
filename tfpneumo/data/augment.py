"""Paired image/mask augmentation as TensorFlow ops, one resampling pass per image.

Everything geometric (horizontal flip, shift-scale-rotate, and the crop or resize from the
cached size ``C`` to the training size ``S``) is folded into ONE 3x3 matrix per image and
applied by a single ``ImageProjectiveTransformV3`` pass: bilinear for the image (float32,
rounded back to uint8), nearest for the uint8 mask (so the mask stays exactly 0/1).
Brightness, contrast and gamma are a pointwise map of the 256 grey levels, so they are
applied as one per-image lookup table ``(256,)`` of grey levels. Images stay grey pixels in
0..255 (the model normalises inside, :mod:`tfpneumo.models.layers`).

All randomness is stateless and drawn from a ``(2,)`` int seed, so a seed gives the same
augmentation on every run. The functions work on batches ``(B, C, C, 1)``; a single image is
a batch of one.

Heavy transforms that TensorFlow lacks (elastic, grid and optical distortion, CLAHE) run
through albumentations in a Python graph op (``PyFuncStateless``) when ``AugmentConfig.heavy``
is true. The op names its callable by a token derived from the augmentation settings
(:func:`register_heavy`), not by TensorFlow's per-process counter, so a tf.data service worker
process that registered the same settings can run the graph (:mod:`tfpneumo.data.service`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import threading
from typing import Literal

import numpy as np

from tfpneumo.config import AugmentConfig

# Columns of the per-image uniform draws, see sample_params.
_N_DRAWS = 12


def _tf():
    from tfpneumo.tfimport import quiet_tensorflow

    return quiet_tensorflow()


def sample_params(seed, batch: int, aug: AugmentConfig) -> dict:
    """Random augmentation parameters for ``batch`` images, each ``(B,)`` float32.

    ``seed`` is a ``(2,)`` int32/int64 tensor. A transform that is not applied gets its
    identity value (angle 0, scale 1, shift 0, alpha 1, beta 0, gamma 1) so the downstream
    maths is exact for it. ``crop_x``/``crop_y`` are uniform in [0, 1) (scaled later).
    """
    tf = _tf()
    u = tf.random.stateless_uniform([batch, _N_DRAWS], seed=seed, dtype=tf.float32)

    def sym(col: int, limit: float):  # uniform in [-limit, limit]
        return (2.0 * u[:, col] - 1.0) * limit

    do_affine = u[:, 1] < aug.affine_p
    do_color = u[:, 2] < aug.color_p
    zeros = tf.zeros([batch], tf.float32)
    ones = tf.ones([batch], tf.float32)
    return {
        "flip": tf.cast(u[:, 0] < aug.hflip, tf.float32),
        "angle": tf.where(do_affine, sym(3, aug.rotate * math.pi / 180.0), zeros),
        "scale": tf.where(do_affine, 1.0 + sym(4, aug.scale), ones),
        "shift_x": tf.where(do_affine, sym(5, aug.shift), zeros),
        "shift_y": tf.where(do_affine, sym(6, aug.shift), zeros),
        "beta": tf.where(do_color, sym(7, aug.brightness), zeros),
        "alpha": tf.where(do_color, 1.0 + sym(8, aug.contrast), ones),
        "gamma": tf.where(do_color, 1.0 + sym(9, aug.gamma), ones),
        "crop_x": u[:, 10],
        "crop_y": u[:, 11],
    }


def transform_matrices(params: dict, in_size: int, out_size: int,
                       crop: Literal["resize", "random_crop"]):
    """``(B, 8)`` float32 projective transforms mapping OUTPUT pixel (x, y) to INPUT pixel.

    The composition is ``K @ Flip @ Aug^-1`` (3x3, homogeneous, pixel-index coordinates as
    ``ImageProjectiveTransformV3`` uses them): ``Aug`` rotates and scales about the output
    centre and shifts by a fraction of ``out_size``; ``Flip`` mirrors x; ``K`` maps the
    ``out_size`` grid into the cached ``in_size`` image, either the whole image (resize,
    half-pixel aligned like ``tf.image.resize``) or a random ``out_size`` window with an
    integer offset (random_crop, when ``in_size > out_size``). With identity parameters and
    ``in_size == out_size`` the matrix is exactly the identity.
    """
    tf = _tf()
    n = tf.shape(params["angle"])[0]
    s_out = float(out_size)
    c = (s_out - 1.0) / 2.0
    zeros = tf.zeros([n], tf.float32)
    ones = tf.ones([n], tf.float32)

    # Aug^-1(q) = c + (1/s) R^T (q - c - t)
    a = 1.0 / params["scale"]
    cos, sin = tf.cos(params["angle"]), tf.sin(params["angle"])
    tx, ty = params["shift_x"] * s_out, params["shift_y"] * s_out
    qx, qy = c + tx, c + ty  # the point that maps back to the centre
    m00, m01 = a * cos, a * sin
    m10, m11 = -a * sin, a * cos
    aug_inv = tf.stack([
        tf.stack([m00, m01, c - (m00 * qx + m01 * qy)], -1),
        tf.stack([m10, m11, c - (m10 * qx + m11 * qy)], -1),
        tf.stack([zeros, zeros, ones], -1),
    ], 1)

    f = params["flip"]  # 1 -> x' = (S-1) - x
    flip = tf.stack([
        tf.stack([1.0 - 2.0 * f, zeros, f * (s_out - 1.0)], -1),
        tf.stack([zeros, ones, zeros], -1),
        tf.stack([zeros, zeros, ones], -1),
    ], 1)

    if crop == "random_crop" and in_size > out_size:
        span = float(in_size - out_size + 1)
        ox = tf.minimum(tf.floor(params["crop_x"] * span), span - 1.0)
        oy = tf.minimum(tf.floor(params["crop_y"] * span), span - 1.0)
        rx = ry = ones
    else:
        r = in_size / out_size
        ox = oy = zeros + (r / 2.0 - 0.5)
        rx = ry = ones * r
    k = tf.stack([
        tf.stack([rx, zeros, ox], -1),
        tf.stack([zeros, ry, oy], -1),
        tf.stack([zeros, zeros, ones], -1),
    ], 1)

    m = tf.linalg.matmul(k, tf.linalg.matmul(flip, aug_inv))
    return tf.reshape(m, [n, 9])[:, :8]


def warp(images, transforms, out_size: int, interpolation: str):
    """``ImageProjectiveTransformV3`` on ``(B, H, W, C)`` (any supported dtype, uint8 here)."""
    tf = _tf()
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.constant([out_size, out_size]),
        fill_value=tf.constant(0.0), interpolation=interpolation, fill_mode="CONSTANT")


def color_lut(params: dict):
    """``(B, 256)`` float32: grey level v -> grey level in [0, 255] after brightness/contrast/gamma.

    ``255 * clip(v/255 * alpha + beta, 0, 1) ** gamma``. An image whose draw is the identity
    (alpha 1, beta 0, gamma 1) gets exactly ``v``.
    """
    tf = _tf()
    v = tf.range(256, dtype=tf.float32)
    alpha = params["alpha"][:, None]
    beta = params["beta"][:, None]
    gamma = params["gamma"][:, None]
    x = tf.clip_by_value(v[None, :] / 255.0 * alpha + beta, 0.0, 1.0)
    x = 255.0 * tf.where(tf.equal(gamma, 1.0), x, tf.pow(x, gamma))
    identity = (tf.equal(alpha, 1.0) & tf.equal(beta, 0.0) & tf.equal(gamma, 1.0))
    return tf.where(identity, v[None, :], x)


def apply_lut(images_u8, lut):
    """uint8 ``(B, H, W, 1)`` through per-image tables ``(B, 256)`` -> float32 (B, H, W, 1)."""
    tf = _tf()
    idx = tf.cast(images_u8, tf.int32)
    return tf.gather(lut, idx, batch_dims=1)


def augment_batch(images, masks, seed, aug: AugmentConfig, out_size: int,
                  crop: Literal["resize", "random_crop"] = "resize"):
    """Augments a batch; geometry identical for image and mask.

    Args:
        images: ``(B, C, C, 1)`` uint8 cached images.
        masks: ``(B, C, C, 1)`` uint8 0/1.
        seed: ``(2,)`` int tensor; the same seed gives the same output.
        aug: probabilities and ranges.
        out_size: S, the training size.
        crop: "resize" (whole image -> S) or "random_crop" (S x S window when C > S).

    Returns:
        images ``(B, S, S, 1)`` float32 grey levels in [0, 255], masks ``(B, S, S, 1)`` float32 0/1.
    """
    return finish_batch(*augment_batch_uint8(images, masks, seed, aug, out_size, crop))


def augment_batch_uint8(images, masks, seed, aug: AugmentConfig, out_size: int,
                        crop: Literal["resize", "random_crop"] = "resize"):
    """The resampling part of :func:`augment_batch`, before the grey-level lookup.

    Returns ``(images (B, S, S, 1) uint8, masks (B, S, S, 1) uint8, luts (B, 256) float32)``:
    a quarter of the bytes of the float32 result, which is what a tf.data service worker
    sends to the trainer; :func:`finish_batch` completes it there.
    """
    tf = _tf()
    in_size = int(images.shape[1])
    batch = tf.shape(images)[0]
    seed = tf.cast(seed, tf.int64)
    params = sample_params(seed, batch, aug)
    transforms = transform_matrices(params, in_size, out_size, crop)
    # Bilinear in float32 then round: the uint8 kernel truncates (a -0.5 grey-level bias, and
    # flat regions come out one level low where the weights sum to 0.99999).
    img = warp(tf.cast(images, tf.float32), transforms, out_size, "BILINEAR")
    img = tf.cast(tf.round(img), tf.uint8)
    msk = warp(masks, transforms, out_size, "NEAREST")
    if aug.heavy:
        heavy_seeds = tf.random.stateless_uniform(
            [batch], seed=tf.random.experimental.stateless_fold_in(seed, 1), minval=0,
            maxval=2**31 - 1,
            dtype=tf.int64)
        img, msk = heavy_batch(img, msk, heavy_seeds, aug)
    img.set_shape([images.shape[0], out_size, out_size, 1])
    msk.set_shape([images.shape[0], out_size, out_size, 1])
    return img, msk, color_lut(params)


def finish_batch(images_u8, masks_u8, luts):
    """uint8 output of :func:`augment_batch_uint8` -> (images float32 grey levels, masks
    float32 0/1), shapes as in :func:`augment_batch`."""
    tf = _tf()
    out = apply_lut(images_u8, luts)
    out.set_shape(images_u8.shape)
    return out, tf.cast(masks_u8, tf.float32)


# ----------------------------------------------------------------------------- albumentations

_local = threading.local()


def albumentations_transform(aug: AugmentConfig):
    """The albumentations Compose of the heavy transforms (one per thread, cached)."""
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    if aug not in cache:
        import albumentations as A
        import cv2

        # One core per call: tf.data runs several calls at once, and a tf.data service
        # worker is meant to use one core (made no measurable difference in-process here).
        cv2.setNumThreads(1)
        cache[aug] = A.Compose([
            # alpha/sigma from the classic Simard setting used by the 1st-place recipe.
            A.ElasticTransform(alpha=120, sigma=6, border_mode=cv2.BORDER_CONSTANT,
                               p=aug.elastic_p),
            A.GridDistortion(border_mode=cv2.BORDER_CONSTANT, p=aug.grid_distortion_p),
            A.OpticalDistortion(distort_limit=0.5, border_mode=cv2.BORDER_CONSTANT,
                                p=aug.optical_distortion_p),
            A.CLAHE(clip_limit=2.0, p=aug.clahe_p),
        ])
    return cache[aug]


def heavy_numpy(images: np.ndarray, masks: np.ndarray, seeds: np.ndarray,
                aug: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """albumentations on uint8 ``(B, S, S, 1)`` images and masks, one seed per image."""
    transform = albumentations_transform(aug)
    out_img = np.empty_like(images)
    out_msk = np.empty_like(masks)
    for i in range(images.shape[0]):
        transform.set_random_seed(int(seeds[i]))
        res = transform(image=images[i, ..., 0], mask=masks[i, ..., 0])
        out_img[i, ..., 0] = res["image"].reshape(images.shape[1:3])
        # Nearest interpolation keeps 0/1; the clip guards against any other mask path.
        out_msk[i, ..., 0] = np.minimum(res["mask"].reshape(masks.shape[1:3]), 1)
    return out_img, out_msk


# Callables registered by register_heavy, by token. TensorFlow's registry holds weak references
# only; this keeps them alive for the life of the process.
_HEAVY_CALLABLES: dict[str, object] = {}


def heavy_token(aug: AugmentConfig) -> str:
    """The graph token naming the heavy transform of ``aug``: the same in every process."""
    fields = sorted(dataclasses.asdict(aug).items())
    return "tfpneumo_heavy_" + hashlib.sha1(repr(fields).encode()).hexdigest()[:16]


def register_heavy(aug: AugmentConfig) -> str:
    """Registers :func:`heavy_numpy` for ``aug`` with TensorFlow's Python-op registry under
    :func:`heavy_token` (idempotent) and returns the token.

    ``tf.numpy_function`` would register it as ``pyfunc_<n>`` with a per-process counter, which
    another process (a tf.data service worker) cannot resolve. There is no public way to choose
    the key, so this goes through :func:`tfpneumo.compat.register_py_func`.
    """
    token = heavy_token(aug)
    if token not in _HEAVY_CALLABLES:
        _tf()
        from tfpneumo.compat import register_py_func

        # A partial, not a function defined here: this runs while tf.data traces the map
        # function, and AutoGraph converts every function defined inside converted code, so a
        # local `def` registered the converted copy, which runs albumentations' Python through
        # AutoGraph's converted_call: ~30 CPU-ms more per 512 px image than in a tf.data
        # service worker, which registers it before any trace (issue 13).
        run = functools.partial(heavy_numpy, aug=aug)

        # Import albumentations/OpenCV here, on the calling thread, not first inside a
        # tf.data thread.
        albumentations_transform(aug)

        _HEAVY_CALLABLES[token] = run
        register_py_func(token, run)
    return token


def heavy_batch(images, masks, seeds, aug: AugmentConfig):
    """:func:`heavy_numpy` as a graph op; static shapes restored afterwards."""
    tf = _tf()
    img, msk = tf.raw_ops.PyFuncStateless(input=[images, masks, seeds], token=register_heavy(aug),
                                          Tout=[tf.uint8, tf.uint8])
    img.set_shape(images.shape)
    msk.set_shape(masks.shape)
    return img, msk
