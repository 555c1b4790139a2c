"""Custom Keras layers of the model (registered, so ``.keras`` files load with safe_mode=True).

Import this module (``tfpneumo.models.unet`` does) before ``keras.saving.load_model``.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="tfpneumo")
class BilinearUpSampling2D(keras.layers.Layer):
    """Bilinear upsampling by an integer factor that also works on unknown H and W.

    ``(B, H, W, C) -> (B, size * H, size * W, C)``, same dtype as the input. Same values as
    ``keras.layers.UpSampling2D(size, interpolation="bilinear")`` (``tf.image.resize``,
    half-pixel centres, no antialiasing), which in Keras 3.15 fails when H or W is symbolic
    (a ``predict`` retraced for a second input size, an export with a ``(None, None)``
    signature): ``ops.image.resize`` tests ``size[0] <= 0`` in Python
    (keras-team/keras PR #22079).
    """

    def __init__(self, size: int = 2, **kwargs):
        super().__init__(**kwargs)
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.size = int(size)

    def call(self, inputs):
        import tensorflow as tf  # the TensorFlow backend is the only one tfpneumo supports

        shape = tf.shape(inputs)
        # Resize in float32: its gradient under XLA rejects a half-precision input mixed with
        # its float32 output ("Seen floating point types of different precisions").
        out = tf.image.resize(tf.cast(inputs, tf.float32),
                              (shape[1] * self.size, shape[2] * self.size), method="bilinear")
        return tf.cast(out, inputs.dtype)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        return (b, None if h is None else h * self.size, None if w is None else w * self.size, c)

    def get_config(self) -> dict:
        return {**super().get_config(), "size": self.size}
