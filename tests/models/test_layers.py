"""FusedBatchNorm against the oracle it replaces: Keras' own BatchNormalization, same weights.

Inputs like the network's: raw pixels (mean ~120, sd ~60, what ``bn_data`` sees) and
activations around 0; outputs, the three gradients, and the moving statistics after a step.
"""

from __future__ import annotations

import numpy as np
import pytest


def pair(keras, epsilon: float, momentum: float, scale: bool = True, dtype: str = "float32"):
    from tfpneumo.models.layers import FusedBatchNorm

    layers = [cls(epsilon=epsilon, momentum=momentum, scale=scale, dtype=dtype)
              for cls in (FusedBatchNorm, keras.layers.BatchNormalization)]
    rng = np.random.default_rng(0)
    for layer in layers:
        layer.build((None, 6, 5, 7))
    for weights in zip(*(layer.weights for layer in layers), strict=True):
        value = rng.uniform(0.5, 1.5, weights[0].shape).astype("float32")
        for w in weights:
            w.assign(value)
    return layers


def step(tf, layer, x, dy):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, "float32") * dy)
    grads = tape.gradient(loss, [x, *layer.trainable_weights])
    return y.numpy().astype("float64"), [g.numpy() for g in grads], [
        layer.moving_mean.numpy(), layer.moving_variance.numpy()]


@pytest.mark.parametrize("centre,spread,epsilon,scale", [
    (120.0, 60.0, 2e-5, False),  # bn_data: raw pixels, no gamma (segmentation-models' ResNets)
    (0.0, 1.0, 2e-5, True),      # an encoder BatchNorm
    (0.3, 0.2, 1e-3, True),      # a decoder BatchNorm (Keras' default epsilon), small variance
])
def test_training_step_equals_keras_batchnorm(tf, centre, spread, epsilon, scale):
    import keras

    fused, plain = pair(keras, epsilon, 0.9, scale)
    rng = np.random.default_rng(1)
    x = (centre + spread * rng.normal(size=(4, 6, 5, 7))).astype("float32")
    dy = rng.normal(size=x.shape).astype("float32")
    (y1, g1, m1), (y2, g2, m2) = step(tf, fused, x, dy), step(tf, plain, x, dy)
    np.testing.assert_allclose(y1, y2, atol=2e-5)
    for a, b in zip(g1, g2, strict=True):  # d/dx, d/dgamma (if any), d/dbeta
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.max(np.abs(b)) / spread)
    # moving statistics: Keras averages the biased batch variance, the kernel returns the
    # unbiased one (n = 4 x 6 x 5 = 120 values a channel: a 0.8 % difference if unscaled)
    for a, b in zip(m1, m2, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6)
    assert abs(np.mean(m1[1]) - np.mean(0.9 * 1.0 + 0.1 * np.var(x, axis=(0, 1, 2)))) < 2.0


def test_inference_and_mixed_precision_follow_keras(tf):
    import keras

    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 5, 7)).astype("float32")
    fused, plain = pair(keras, 1e-3, 0.99)
    np.testing.assert_array_equal(fused(x, training=False).numpy(), plain(x, training=False).numpy())
    fused, plain = pair(keras, 1e-3, 0.99, dtype="mixed_bfloat16")
    y1, y2 = fused(x, training=True), plain(x, training=True)
    assert y1.dtype == y2.dtype == tf.bfloat16
    np.testing.assert_allclose(y1.numpy().astype("float32"), y2.numpy().astype("float32"),
                               atol=2e-2)  # bfloat16 keeps 8 bits: one step of 2^-7 at |y| < 2
    np.testing.assert_allclose(fused.moving_variance.numpy(), plain.moving_variance.numpy(),
                               rtol=2e-6)


def test_the_unet_trains_through_the_fused_kernel(tf):
    """Every BatchNorm of a built UNet (sm's encoder and our decoder) is the fused one, and its
    training graph holds FusedBatchNormV3 (not Keras' moments)."""
    from tfpneumo.config import ModelConfig
    from tfpneumo.models.layers import FusedBatchNorm
    from tfpneumo.models.unet import build_model

    net = build_model(ModelConfig(encoder="resnet18", encoder_weights="none",
                                  decoder_filters=(16, 8, 8, 8, 8)))
    norms = [layer for layer in net.layers if "BatchNorm" in type(layer).__name__]
    assert len(norms) > 20 and all(isinstance(layer, FusedBatchNorm) for layer in norms)
    graph = tf.function(lambda x: net(x, training=True)).get_concrete_function(
        tf.TensorSpec((1, 64, 64, 1), tf.float32)).graph
    ops = {op.type for op in graph.get_operations()}
    assert "FusedBatchNormV3" in ops and "SquaredDifference" not in ops
