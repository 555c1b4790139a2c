"""Custom Keras layers of the model (registered, so ``.keras`` files load with safe_mode=True).

Import this module (``tfpneumo.models.unet`` does) before ``keras.saving.load_model``.
:class:`BilinearUpSampling2D` is an upstream workaround and lives in :mod:`tfpneumo.compat`;
it is re-exported here so the model's layers have one import.
"""

from __future__ import annotations

import keras

from tfpneumo.compat import BilinearUpSampling2D

__all__ = ["INPUT_CONVENTION", "BilinearUpSampling2D", "GreyPixels"]

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
