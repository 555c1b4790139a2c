"""Grad-CAM of the classification head against hand-worked maps: with global average pooling
and one dense unit, Grad-CAM is Zhou et al.'s CAM (dense weights times feature maps, ReLU)."""

from __future__ import annotations

import numpy as np
import pytest
from factories import make_run, tiny_model_file

import tfpneumo  # noqa: F401  (sets SM_FRAMEWORK before segmentation_models is imported)
from tfpneumo.inference.gradcam import (
    HEAT_ALPHA,
    explain,
    grad_cam,
    gradcam_model,
    heat_overlay,
    normalise,
)

# A 4 x 5 image with positive and negative values (the features' ReLU matters).
X = np.array([[0.5, -1.0, 2.0, 0.0, -0.5],
              [1.0, 0.25, -2.0, 3.0, 0.0],
              [-1.5, 0.75, 1.5, -0.25, 2.5],
              [0.0, -3.0, 0.5, 1.0, -1.0]], np.float32)


def _linear_head(keras, gains, weights, bias=0.3):
    """image -> 1x1 conv (channel k = gains[k] * x, no bias) -> ReLU "relu1" -> global average
    pool -> Dense(1) "cls_head_dense" -> sigmoid "label". Features A_k = relu(gains[k] * x)."""
    gains, weights = np.asarray(gains, np.float32), np.asarray(weights, np.float32)
    image = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(len(gains), 1, use_bias=False, name="features")
    dense = keras.layers.Dense(1, name="cls_head_dense")
    x = keras.layers.ReLU(name="relu1")(conv(image))
    x = dense(keras.layers.GlobalAveragePooling2D()(x))
    net = keras.Model(image, {"label": keras.layers.Activation("sigmoid", name="label")(x)})
    conv.set_weights([gains.reshape(1, 1, 1, -1)])
    dense.set_weights([weights.reshape(-1, 1), np.array([bias], np.float32)])
    return net


def test_grad_cam_of_a_linear_head_is_the_class_activation_map(keras):
    """gains (1, -1, 0.5), weights (2, -1, 0.5): sum_k w_k A_k = 2 relu(x) - relu(-x) +
    0.25 relu(x), i.e. 2.25 x where x > 0 and x (negative) elsewhere; the ReLU keeps 2.25
    relu(x). Grad-CAM's channel weights are w_k / (H W) (the pool's gradient), so the map is
    2.25 relu(x) / 20, and normalised relu(x) / 3."""
    net = _linear_head(keras, [1.0, -1.0, 0.5], [2.0, -1.0, 0.5])
    cam = grad_cam(gradcam_model(net), X[None, ..., None])
    assert cam.shape == (1, 4, 5)
    np.testing.assert_allclose(cam[0], 2.25 * np.maximum(X, 0) / X.size, atol=1e-6)
    np.testing.assert_allclose(normalise(cam[0]), np.maximum(X, 0) / 3.0, atol=1e-6)


def test_the_logit_is_the_input_of_the_final_sigmoid(keras):
    net = _linear_head(keras, [1.0, -1.0, 0.5], [2.0, -1.0, 0.5], bias=0.3)
    features, logit = gradcam_model(net)(X[None, ..., None])
    # the pool sees every pixel, negatives too: mean(2.25 relu(x) - relu(-x)) + bias
    expected = (2.25 * np.maximum(X, 0) - np.maximum(-X, 0)).mean() + 0.3
    assert expected == pytest.approx(1.3)  # (2.25 * 13 - 9.25) / 20 + 0.3
    np.testing.assert_allclose(np.asarray(logit)[0, 0], expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(features)[0, ..., 1], np.maximum(-X, 0), atol=1e-6)


def test_explain_averages_models_and_the_mirrored_pass(keras):
    """Pointwise models: the map of the mirrored image, mirrored back, is the map itself, so
    hflip changes nothing. Model b sees relu(-x): its normalised map is relu(-x) / 3; the
    ensemble is the mean of the two normalised maps, normalised."""
    a = _linear_head(keras, [1.0, -1.0, 0.5], [2.0, -1.0, 0.5])
    b = _linear_head(keras, [-1.0], [1.0])
    image = X  # explain takes the network image; these models take any float input
    cams = [gradcam_model(a), gradcam_model(b)]
    one = explain(cams[:1], image, X.shape, hflip=True)
    np.testing.assert_allclose(one, np.maximum(X, 0) / 3.0, atol=1e-6)
    np.testing.assert_allclose(explain(cams[:1], image, X.shape, hflip=False), one, atol=1e-6)
    both = explain(cams, image, X.shape, hflip=True)
    mean = 0.5 * (np.maximum(X, 0) / 3.0 + np.maximum(-X, 0) / 3.0)
    np.testing.assert_allclose(both, mean / mean.max(), atol=1e-6)
    # resized to the source image: bilinear from the feature grid, still in [0, 1]
    big = explain(cams[:1], image, (8, 10), hflip=False)
    assert big.shape == (8, 10) and 0.0 <= big.min() and big.max() <= 1.0 + 1e-6


def test_grad_cam_of_the_unet_is_its_head_weights_times_the_bottleneck(tf):
    """The real network: its head is global average pooling -> dropout (off) -> Dense(1), so
    Grad-CAM is relu(sum_k w_k A_k) / (h w) over the encoder's last map (relu1, x32)."""
    from tfpneumo.models.saved import load_network

    net = load_network(tiny_model_file())
    image = np.random.default_rng(0).uniform(0, 255, (1, 64, 96, 1)).astype(np.float32)
    model = gradcam_model(net)
    features, logit = (np.asarray(t) for t in model(image))
    assert features.shape == (1, 2, 3, 512)
    label = np.asarray(net(image, training=False)["label"])[0, 0]
    np.testing.assert_allclose(1.0 / (1.0 + np.exp(-logit[0, 0])), label, atol=1e-6)
    w = net.get_layer("cls_head_dense").get_weights()[0][:, 0]
    expected = np.maximum(features[0] @ w, 0.0) / 6.0
    np.testing.assert_allclose(grad_cam(model, image)[0], expected, rtol=1e-4, atol=1e-6)


def test_grad_cam_of_a_bfloat16_network_is_the_float32_map(tf):
    """predict --precision bfloat16 --explain: the map of the network rebuilt in
    mixed_bfloat16 (its features bfloat16) is the float32 network's, to bfloat16's 8 bits."""
    from tfpneumo.inference.ensemble import in_bfloat16
    from tfpneumo.models.saved import load_network

    net = load_network(tiny_model_file())
    image = np.random.default_rng(1).uniform(0, 255, (1, 64, 96, 1)).astype(np.float32)
    full = normalise(grad_cam(gradcam_model(net), image)[0])
    half = normalise(grad_cam(gradcam_model(in_bfloat16(net)), image)[0])
    assert full.max() == 1.0 and half.dtype == np.float32
    np.testing.assert_allclose(half, full, atol=0.05)


def test_heat_overlay_keeps_the_radiograph_where_the_map_is_zero():
    grey = np.full((256, 256), 100, np.uint8)
    cam = np.zeros((256, 256), np.float32)
    cam[200:, 200:] = 1.0
    rgb = heat_overlay(grey, cam, 0.42)
    assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[150, 150], [100, 100, 100])
    # JET at 1.0 is (128, 0, 0) in RGB (OpenCV's table), blended with weight HEAT_ALPHA
    hot = np.rint((1 - HEAT_ALPHA) * 100 + HEAT_ALPHA * np.array([128, 0, 0]))
    np.testing.assert_array_equal(rgb[230, 230], hot)
    corner = rgb[:40, :200]
    assert corner.max() == 255 and corner.min() < 60  # the caption: white text on a dark box


def test_predict_explain_writes_a_gradcam_png_at_the_dicom_size(siim_mini, tmp_path):
    from PIL import Image

    from tfpneumo.data.dicom import read_dicom
    from tfpneumo.inference.pictures import predict

    cfg = make_run(tmp_path)
    path = sorted((siim_mini / "dicom-images-test").glob("*.dcm"))[0]
    summary = predict(cfg, [path], out=tmp_path / "pred", size=64, workdir=tmp_path,
                      rule={"kind": "triplet", "top": 0.5, "bottom": 0.5, "min_area": 1},
                      explain=True)
    assert "wrote 4 files" in summary and "Grad-CAM" in summary
    picture = Image.open(tmp_path / "pred" / f"{path.stem}_gradcam.png")
    assert picture.size == (1024, 1024) and picture.mode == "RGB"
    rgb = np.asarray(picture).astype(int)
    grey, _ = read_dicom(path)
    below = slice(80, None)  # under the caption
    tinted = np.abs(rgb[below] - grey[below][..., None]).max(axis=2) > 2
    assert 0.0 < tinted.mean()  # the map is drawn somewhere
