"""Kaggle Dice: hand-worked cases, a set-based reference, the streaming Keras metric."""

from __future__ import annotations

import numpy as np
import pytest

from tfpneumo.tfimport import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402

from tfpneumo.training.metrics import (  # noqa: E402
    KaggleDice,
    MetricError,
    batch_dice,
    dice_metrics,
    kaggle_dice,
    per_image_dice,
)


def masks_from_pixels(pixel_sets, shape=(4, 4)) -> np.ndarray:
    """List of sets of (row, col) -> ``(N, H, W) uint8``."""
    out = np.zeros((len(pixel_sets), *shape), np.uint8)
    for i, pixels in enumerate(pixel_sets):
        for r, c in pixels:
            out[i, r, c] = 1
    return out


def set_dice(pred: np.ndarray, true: np.ndarray) -> list[float]:
    """Reference from the competition's definition, on sets of pixel indices."""
    scores = []
    for p, t in zip(pred, true, strict=True):
        a, b = set(np.flatnonzero(p)), set(np.flatnonzero(t))
        scores.append(1.0 if not a and not b else 2 * len(a & b) / (len(a) + len(b)))
    return scores


TWO = {(1, 1), (1, 2)}
FOUR = {(1, 1), (1, 2), (2, 1), (2, 2)}


def test_hand_worked_cases():
    pred = masks_from_pixels([set(), set(), FOUR, TWO, FOUR, {(0, 0)}])
    true = masks_from_pixels([set(), FOUR, set(), FOUR, FOUR, {(3, 3)}])
    expected = [1.0, 0.0, 0.0, 2 * 2 / 6, 1.0, 0.0]
    np.testing.assert_allclose(per_image_dice(pred, true), expected)
    assert kaggle_dice(pred, true) == pytest.approx((1 + 0 + 0 + 2 / 3 + 1 + 0) / 6)
    # (N, H, W, 1), bool and 0/255 masks give the same answer.
    assert kaggle_dice(pred[..., None].astype(bool), true[..., None] * 255) == pytest.approx(
        kaggle_dice(pred, true))


def test_against_set_reference():
    rng = np.random.default_rng(0)
    pred = rng.uniform(size=(20, 16, 16)) > 0.8
    true = rng.uniform(size=(20, 16, 16)) > 0.85
    pred[:5] = False                      # some empty predictions
    true[3:8] = False                     # some empty truths (3, 4: both empty)
    np.testing.assert_allclose(per_image_dice(pred, true), set_dice(pred, true))
    assert kaggle_dice(pred, true) == pytest.approx(np.mean(set_dice(pred, true)))


def test_bad_shapes_raise():
    with pytest.raises(MetricError, match="differ in shape"):
        per_image_dice(np.zeros((2, 4, 4)), np.zeros((3, 4, 4)))
    with pytest.raises(MetricError, match=r"\(N, H, W\)"):
        per_image_dice(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(MetricError, match="no images"):
        kaggle_dice(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))


def random_probabilities(seed: int, n: int = 5, size: int = 16):
    """Truth with empty images and probability maps with blobs, noise and tiny specks."""
    rng = np.random.default_rng(seed)
    true = np.zeros((n, size, size, 1), np.float32)
    prob = rng.uniform(0, 0.35, true.shape).astype(np.float32)
    for i in range(n):
        y, x = rng.integers(0, size - 6, 2)
        if i % 3:
            true[i, y:y + 5, x:x + 4] = 1
        if i % 2:
            prob[i, y + 1:y + 6, x:x + 5] = rng.uniform(0.3, 1.0, (5, 5, 1))
        if i % 4 == 0:  # a 2-pixel speck that min_area >= 3 removes
            prob[i, 0, 0], prob[i, 0, 1] = 0.95, 0.45
    return true, prob


@pytest.mark.parametrize("threshold,min_area", [(0.5, 0), (0.3, 0), (0.4, 3), (0.6, 10)])
def test_streaming_metric_equals_kaggle_dice(threshold, min_area):
    batches = [random_probabilities(seed) for seed in range(3)]
    metric = KaggleDice(threshold=threshold, min_area=min_area)
    for true, prob in batches:
        metric.update_state(true, prob)
    true = np.concatenate([b[0] for b in batches])
    pred = np.concatenate([b[1] for b in batches]) > threshold
    small = pred.reshape(len(pred), -1).sum(axis=1) < min_area
    pred[small] = False
    expected = np.mean(set_dice(pred[..., 0], true[..., 0] > 0.5))
    assert float(metric.result()) == pytest.approx(expected, rel=1e-6)
    assert float(metric.result()) == pytest.approx(kaggle_dice(pred, true), rel=1e-6)
    metric.reset_state()
    assert float(metric.result()) == 0.0
    metric.update_state(*batches[0])
    pred0 = batches[0][1] > threshold
    pred0[pred0.reshape(len(pred0), -1).sum(axis=1) < min_area] = False
    assert float(metric.result()) == pytest.approx(kaggle_dice(pred0, batches[0][0]), rel=1e-6)


def test_sample_weight_weighs_images():
    true, prob = random_probabilities(4, n=4)
    dice = per_image_dice(prob > 0.5, true)
    weights = np.array([1.0, 0.0, 2.0, 1.0], np.float32)
    metric = KaggleDice()
    metric.update_state(true, prob, sample_weight=weights[:, None])
    assert float(metric.result()) == pytest.approx((dice * weights).sum() / 4, rel=1e-6)


def test_half_precision_large_maps():
    true = np.zeros((1, 1024, 1024, 1), np.float32)
    true[0, 100:600, 100:400] = 1                 # 150k pixels: beyond float16's 65504
    prob = np.zeros_like(true)
    prob[0, 200:700, 100:400] = 0.9
    expected = 2 * 400 * 300 / (2 * 500 * 300)
    for dtype in ("float16", "bfloat16", "float32"):
        value = batch_dice(tf.cast(true, dtype), tf.cast(prob, dtype)).numpy()
        assert value[0] == pytest.approx(expected, rel=1e-6), dtype


def test_graph_mode_update():
    true, prob = random_probabilities(5)
    metric = KaggleDice(0.5)
    tf.function(metric.update_state)(tf.constant(true), tf.constant(prob))
    assert float(metric.result()) == pytest.approx(kaggle_dice(prob > 0.5, true), rel=1e-6)


def test_names_and_validation():
    assert [m.name for m in dice_metrics()] == ["dice@0.3", "dice@0.4", "dice@0.5", "dice@0.6"]
    assert KaggleDice(0.45, name="x").name == "x"
    with pytest.raises(MetricError, match="threshold"):
        KaggleDice(1.5)
    with pytest.raises(MetricError, match="min_area"):
        KaggleDice(0.5, min_area=-1)


def test_metric_serialization_round_trip():
    true, prob = random_probabilities(6)
    metric = KaggleDice(threshold=0.4, min_area=3)
    config = metric.get_config()
    clone = KaggleDice.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(metric), safe_mode=True)
    assert type(restored) is KaggleDice and restored.get_config() == config
    for m in (metric, restored):
        m.update_state(true, prob)
    assert float(restored.result()) == pytest.approx(float(metric.result()))


def test_compiled_metric_matches_numpy_on_predictions():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 1))
    # An identity 1x1 conv: the "predictions" are the probability maps, empties and specks kept.
    conv = keras.layers.Conv2D(1, 1, kernel_initializer="ones", name="mask")
    mask = conv(inputs)
    label = keras.layers.Dense(1, activation="sigmoid", name="label")(
        keras.layers.GlobalAveragePooling2D()(mask))
    model = keras.Model(inputs, {"mask": mask, "label": label})
    model.compile(loss={"mask": "binary_crossentropy", "label": "binary_crossentropy"},
                  metrics={"mask": dice_metrics((0.4, 0.5), min_area=3)})
    true, prob = random_probabilities(7, n=10)
    labels = true.reshape(len(true), -1).max(axis=1, keepdims=True)
    logs = model.evaluate(prob, {"mask": true, "label": labels}, batch_size=3, verbose=0,
                          return_dict=True)
    predicted = model.predict(prob, batch_size=3, verbose=0)["mask"]
    np.testing.assert_allclose(predicted, prob, rtol=1e-6)
    for threshold in (0.4, 0.5):
        pred = predicted > threshold
        pred[pred.reshape(len(pred), -1).sum(axis=1) < 3] = False
        assert logs[f"mask_dice@{threshold:g}"] == pytest.approx(kaggle_dice(pred, true),
                                                                 rel=1e-5)
