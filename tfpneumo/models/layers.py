"""Custom Keras layers of the model (registered, so ``.keras`` files load with safe_mode=True).

Import this module (``tfpneumo.models.unet`` does) before ``keras.saving.load_model``.
:class:`BilinearUpSampling2D` is an upstream workaround and lives in :mod:`tfpneumo.compat`;
it is re-exported here so the model's layers have one import.
"""

from __future__ import annotations

import keras

from tfpneumo.compat import BilinearUpSampling2D

__all__ = ["INPUT_CONVENTION", "BilinearUpSampling2D", "FusedBatchNorm", "GreyPixels"]

# What the network takes, recorded in every saved .keras file (GreyPixels' config). Files of
# tfpneumo < 0.3 took ImageNet-normalised RGB and have no GreyPixels layer;
# tfpneumo.models.saved refuses them with one line.
INPUT_CONVENTION = "grey-pixels-0-255"


@keras.saving.register_keras_serializable(package="tfpneumo")
class GreyPixels(keras.layers.Layer):
    """The model's input convention: grey pixels in [0, 255], uint8 or float, ``(B, H, W, 1)``.

    Casts to the compute dtype and repeats the grey channel to the three channels the ResNet
    encoder (and its ImageNet weights) expect. Normalisation happens next, inside the encoder:
    segmentation-models' ResNets start with a BatchNormalization (``bn_data``) over raw
    0..255 RGB, and their ImageNet weights hold ImageNet's pixel statistics there.
    """

    def __init__(self, convention: str = INPUT_CONVENTION, **kwargs):
        super().__init__(**kwargs)
        if convention != INPUT_CONVENTION:
            raise ValueError(f"input convention {convention!r}: this tfpneumo takes "
                             f"{INPUT_CONVENTION!r}")
        self.convention = convention

    def call(self, inputs):
        from keras import ops

        x = ops.cast(inputs, self.compute_dtype)
        return ops.repeat(x, 3, axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)

    def get_config(self) -> dict:
        return {**super().get_config(), "convention": self.convention}


@keras.saving.register_keras_serializable(package="tfpneumo")
class FusedBatchNorm(keras.layers.BatchNormalization):
    """Keras' BatchNormalization whose training step is TensorFlow's fused kernel.

    Keras 3 normalises with separate ops (moments, then multiply and add: about five passes
    over the activations forward and as many again for the gradient); ``FusedBatchNormV3``
    and its gradient are one kernel each. Measured on the 256 px x 4 float32 train step of
    UNet-ResNet34 on 2 CPU cores: BatchNorm was 14-16 % of the op time, the step 10 %
    faster fused. The same results as Keras' layer (tests/models/test_layers.py): the kernel's
    batch variance is Bessel-corrected, and is scaled back to the biased one Keras averages
    into ``moving_variance``. Inference, synchronized moments (``sync_batchnorm``),
    renorm, masks, other ranks and epsilons under the kernel's floor use Keras' code.
    """

    def _fused(self, inputs, training, mask) -> bool:
        return (bool(training) and self.trainable and mask is None and not self.renorm
                and not self.synchronized and keras.backend.backend() == "tensorflow"
                and len(inputs.shape) == 4 and self.axis in (-1, 3) and self.epsilon > 1.001e-5)

    def call(self, inputs, training=None, mask=None):
        if not self._fused(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = tf.cast(inputs, "float32")  # as Keras: statistics in float32 under mixed precision
        channels = x.shape[-1]
        scale = tf.cast(self.gamma, "float32") if self.scale else tf.ones([channels])
        offset = tf.cast(self.beta, "float32") if self.center else tf.zeros([channels])
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, epsilon=self.epsilon, data_format="NHWC", is_training=True)[:3]
        n = tf.cast(tf.size(x) // channels, "float32")
        variance = variance * ((n - 1.0) / tf.maximum(n, 1.0))  # unbiased -> biased
        self.moving_mean.assign(self.moving_mean * self.momentum
                                + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum
                                    + variance * (1.0 - self.momentum))
        return tf.cast(y, self.compute_dtype)
