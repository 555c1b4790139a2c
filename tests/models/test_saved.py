"""Saved networks record their input convention; files of tfpneumo < 0.3 are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from factories import tiny_model_file

from tfpneumo.errors import TfpneumoError


@pytest.fixture(scope="module")
def keras(tf):
    import keras

    return keras


@pytest.fixture(scope="module")
def saved(tf):
    from tfpneumo.models import saved

    return saved


def test_a_saved_network_records_its_convention_and_loads(saved, keras):
    from tfpneumo.models.layers import INPUT_CONVENTION

    path = tiny_model_file()
    assert saved.input_convention(path) == INPUT_CONVENTION
    net = saved.load_network(path)
    grey = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 1)).astype(np.uint8)
    want = keras.saving.load_model(path, safe_mode=True, compile=False)(grey, training=False)
    np.testing.assert_array_equal(np.asarray(net(grey, training=False)["mask"]),
                                  np.asarray(want["mask"]))


def test_a_file_of_the_previous_convention_is_refused(saved, keras, tmp_path):
    """The 0.2 layout: ImageNet-normalised RGB in, a Rescaling back to pixels, no GreyPixels."""
    from keras import layers

    image = keras.Input((None, None, 3), name="image")
    x = layers.Rescaling(scale=[58.395, 57.12, 57.375], offset=[123.675, 116.28, 103.53],
                         name="imagenet_to_pixels")(image)
    x = layers.Conv2D(1, 1, name="mask_logits")(x)
    mask = layers.Activation("sigmoid", name="mask")(x)
    label = layers.Dense(1, activation="sigmoid", name="label")(
        layers.GlobalAveragePooling2D()(x))
    path = tmp_path / "best.keras"
    keras.Model(image, {"mask": mask, "label": label}).save(path)
    with pytest.raises(TfpneumoError) as e:
        saved.load_network(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "tfpneumo < 0.3" in message


def test_not_a_keras_file_is_one_line(saved, tmp_path):
    path = tmp_path / "final.keras"
    path.write_bytes(b"not a zip")
    with pytest.raises(TfpneumoError, match="cannot load model") as e:
        saved.load_network(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
