"""Grad-CAM (Selvaraju et al., 2017) of the classification head: where the image-level
"pneumothorax" evidence sits.

For one network: the gradients of the label *logit* (the input of the final sigmoid, layer
``label``) with respect to the deepest encoder feature map ``relu1`` (x32 smaller than the
input, the map both the head and the decoder start from) are averaged over the map's pixels
into one weight per channel; the map is the ReLU of the channel-weighted sum of the
features. With the head's global average pooling and one dense unit this is exactly the CAM
of Zhou et al. (2016): dense weights times feature maps, ReLU.

Each map is normalised to a maximum of 1 (all zeros when nothing speaks for the label) and
resized (bilinear) to the source image. An ensemble and its TTA average these maps, one per
forward pass that ``predict`` averages for the label: every fold, every scale, and with
``hflip`` the map of the mirrored image mirrored back. The average is normalised again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tfpneumo.drawing import caption

FEATURE_LAYER = "relu1"  # tfpneumo.models.unet.ENCODER_OUTPUT
LABEL_LAYER = "label"  # sigmoid of the head; its input is the logit
HEAT_ALPHA = 0.6  # blend weight of the heat colour at the map's maximum


def gradcam_model(net, feature_layer: str = FEATURE_LAYER, label_layer: str = LABEL_LAYER):
    """``images (B, H, W, 1) -> (features (B, h, w, C), logit (B, 1))`` sharing ``net``'s layers."""
    import keras

    logit = net.get_layer(label_layer).input
    return keras.Model(net.input, [net.get_layer(feature_layer).output, logit])


def grad_cam(cam_model, images: np.ndarray) -> np.ndarray:
    """Un-normalised Grad-CAM maps: images (B, H, W, 1) float32 grey pixels -> (B, h, w)
    float32 >= 0 at the feature map's resolution."""
    import tensorflow as tf

    x = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        features, logit = cam_model(x, training=False)
        total = tf.reduce_sum(tf.cast(logit, tf.float32))  # samples are independent
    # the gradient with respect to the features the logit was computed from (bfloat16 in a
    # network of predict --precision bfloat16), then both in float32
    grads = tf.cast(tape.gradient(total, features), tf.float32)
    features = tf.cast(features, tf.float32)
    weights = tf.reduce_mean(grads, axis=(1, 2))  # (B, C): one weight per channel
    cam = tf.nn.relu(tf.einsum("bhwc,bc->bhw", features, weights))
    return cam.numpy()


def normalise(cam: np.ndarray) -> np.ndarray:
    """(h, w) map scaled to a maximum of 1; all zeros stays zeros."""
    top = float(cam.max(initial=0.0))
    return (cam / top).astype(np.float32) if top > 0 else np.zeros_like(cam, np.float32)


def _resize(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(cam.astype(np.float32), (shape[1], shape[0]),
                      interpolation=cv2.INTER_LINEAR)


def explain(cam_models: Sequence, image: np.ndarray, shape: tuple[int, int], hflip: bool = True,
            scales: Sequence[float] = (1.0,)) -> np.ndarray:
    """The ensemble's Grad-CAM of one image.

    image: (size, size) uint8 as the network sees it; shape: (H, W) of the source. Returns
    (H, W) float32 in [0, 1]: the mean over models, scales and flips of the normalised maps
    (see the module docstring), normalised."""
    import tensorflow as tf

    from tfpneumo.inference.ensemble import scaled_size

    base = image.astype(np.float32)[None, ..., None]
    maps = []
    for scale in scales:
        x = base
        if scale != 1.0:
            side = [scaled_size(s, scale) for s in image.shape]
            x = tf.image.resize(base, side, method="bilinear", antialias=scale < 1.0).numpy()
        variants = [(x, False)] + ([(x[:, :, ::-1].copy(), True)] if hflip else [])
        for model in cam_models:
            for batch, mirrored in variants:
                cam = grad_cam(model, batch)[0]
                maps.append(_resize(normalise(cam[:, ::-1] if mirrored else cam), shape))
    return normalise(np.mean(maps, axis=0))


def heat_overlay(image: np.ndarray, cam: np.ndarray, label_prob: float) -> np.ndarray:
    """image (H, W) uint8 grey, cam (H, W) in [0, 1] -> (H, W, 3) uint8 RGB: the radiograph
    blended with the JET colour of the map, weight ``HEAT_ALPHA * cam`` (grey where the map
    is 0), captioned ``Grad-CAM, pneumothorax p=0.87``."""
    import cv2
    from PIL import Image

    heat = cv2.applyColorMap(np.clip(np.rint(cam * 255.0), 0, 255).astype(np.uint8),
                             cv2.COLORMAP_JET)[..., ::-1].astype(np.float32)  # BGR -> RGB
    grey = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    alpha = (HEAT_ALPHA * np.clip(cam, 0.0, 1.0))[..., None]
    rgb = (1.0 - alpha) * grey + alpha * heat
    picture = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    caption(picture, f"Grad-CAM, pneumothorax p={label_prob:.2f}")
    return np.asarray(picture)
