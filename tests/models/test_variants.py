"""Model variants of issue 15: the UNet++ decoder (model.decoder) and GroupNorm (model.norm)."""

from __future__ import annotations

import numpy as np
import pytest

import tfpneumo  # noqa: F401  (sets SM_FRAMEWORK before segmentation_models is imported)
from tfpneumo import TfpneumoError
from tfpneumo.config import ConfigError, LossConfig, ModelConfig, load_config

# Encoder levels as the UNet++ paper numbers them: X^{i,0} at 1/2^(i+1) of the input; the
# taps of sm's resnet18 (x2 relu0, x4, x8, x16) and its bottleneck (x32, 512 channels).
TAPS = {0: "relu0", 1: "stage2_unit1_relu1", 2: "stage3_unit1_relu1", 3: "stage4_unit1_relu1",
        4: "relu1"}
CHANNELS = (64, 64, 128, 256, 512)  # of those five (He et al. 2016, basic blocks)
FILTERS = (256, 128, 64, 32, 16)  # decoder_filters: x16, x8, x4, x2, x1


@pytest.fixture(scope="module")
def unet(tf):
    from tfpneumo.models import unet

    return unet


def images(b: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (b, size, size, 1)).astype("float32")


@pytest.fixture(scope="module")
def unetpp(unet):
    return unet.build_model(ModelConfig(encoder="resnet18", encoder_weights="none",
                                        decoder="unetpp", attention="none"))


def test_unetpp_nested_nodes_and_their_inputs(unet, unetpp):
    model = unetpp

    def channels(i, j):
        return CHANNELS[i] if j == 0 else FILTERS[3 - i]

    def node_output(i, j):
        name = TAPS[i] if j == 0 else f"decoder_x{i}_{j}_conv2_relu"
        return model.get_layer(name).output

    concats = sorted(layer.name for layer in model.layers if layer.name.endswith("_concat")
                     and layer.name.startswith("decoder_"))
    # j = 1..4, i = 0..4-j: 4 + 3 + 2 + 1 = 10 nested nodes, each with one concatenation
    assert concats == sorted(f"decoder_x{i}_{j}_concat" for j in range(1, 5) for i in range(5 - j))
    for j in range(1, 5):
        for i in range(5 - j):
            up = model.get_layer(f"decoder_x{i}_{j}_upsample")
            assert up.input is node_output(i + 1, j - 1), (i, j)
            inputs = model.get_layer(f"decoder_x{i}_{j}_concat").input
            assert len(inputs) == j + 1
            assert inputs[0] is up.output
            for k in range(j):  # dense skips: every earlier node of the same level
                assert inputs[k + 1] is node_output(i, k), (i, j, k)
            out = node_output(i, j)
            assert tuple(out.shape[1:]) == (None, None, FILTERS[3 - i])
            # input channels: the upsampled node below, the tap, the j - 1 earlier nodes
            cin = channels(i + 1, j - 1) + CHANNELS[i] + (j - 1) * FILTERS[3 - i]
            assert model.get_layer(f"decoder_x{i}_{j}_conv1").kernel.shape == (3, 3, cin,
                                                                                FILTERS[3 - i])
    # X^{0,4} -> the final x1 block (no skip) -> mask; the head stays on the bottleneck
    assert model.get_layer("decoder_final_upsample").input is node_output(0, 4)
    assert model.get_layer("mask_logits").input is model.get_layer("decoder_final_conv2_relu").output
    assert model.get_layer("cls_head_avgpool").input is model.get_layer("relu1").output
    assert not any(layer.name.startswith("decoder_stage") for layer in model.layers)
    # the encoder is found as before (freezing, encoder weights): no decoder layer in it
    encoder = {layer.name for layer in unet.encoder_layers(model)}
    assert "relu1" in encoder and not any(n.startswith(("decoder", "cls_head", "mask"))
                                          for n in encoder)


def test_unetpp_shapes_and_one_training_step(tf, keras, unet, unetpp):
    sub = keras.Model(unetpp.inputs, [unetpp.get_layer(f"decoder_x{i}_{4 - i}_conv2_relu").output
                                      for i in range(4)])
    for i, value in enumerate(sub(images(1, 64), training=False)):
        assert value.shape == (1, 64 // 2 ** (i + 1), 64 // 2 ** (i + 1), FILTERS[3 - i])
    out = unetpp(images(2, 96), training=False)
    assert out["mask"].shape == (2, 96, 96, 1) and out["label"].shape == (2, 1)
    assert out["mask"].dtype == "float32"

    from tfpneumo.training.losses import build_losses

    # one eager step (a compiled train_on_batch spends ~20 s tracing this graph on 2 cores)
    model = unet.build_model(ModelConfig(encoder="resnet18", encoder_weights="none",
                                         decoder="unetpp", decoder_filters=(32, 16, 16, 8, 8)))
    losses, weights = build_losses(LossConfig(), from_logits=False)
    mask = np.zeros((2, 64, 64, 1), np.float32)
    mask[0, 10:30, 20:40] = 1
    y = {"mask": mask, "label": np.array([[1.0], [0.0]], np.float32)}
    before = model.get_layer("decoder_x1_2_conv1").kernel.numpy()
    with tf.GradientTape() as tape:
        out = model(images(2, 64), training=True)
        loss = sum(weights[k] * losses[k](y[k], out[k]) for k in ("mask", "label"))
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    keras.optimizers.Adam(1e-3).apply_gradients(zip(grads, model.trainable_variables, strict=True))
    assert not np.array_equal(model.get_layer("decoder_x1_2_conv1").kernel.numpy(), before)


def np_group_norm(x, gamma, beta, groups, eps):
    """GroupNorm (Wu and He 2018) in float64: channels split into groups, mean and variance
    over (H, W, channels of the group) per image."""
    b, h, w, c = x.shape
    g = x.astype(np.float64).reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * gamma + beta


def test_group_norm_in_the_decoder_only(keras, unet):
    model = unet.build_model(ModelConfig(encoder="resnet18", encoder_weights="none", norm="group",
                                         bn_momentum=0.9))
    gn = [layer for layer in model.layers if isinstance(layer, keras.layers.GroupNormalization)]
    assert len(gn) == 2 * 5 and all(layer.groups == 8 for layer in gn)
    assert all(layer.name.startswith("decoder_stage") and layer.name.endswith("_gn") for layer in gn)
    # BatchNorm is left in the encoder only (its ImageNet statistics), with bn_momentum applied
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    encoder = {id(layer) for layer in unet.encoder_layers(model)}
    assert bns and all(id(layer) in encoder and layer.momentum == 0.9 for layer in bns)

    # one block against numpy: conv output -> GroupNorm (random gamma, beta) -> ReLU
    layer = model.get_layer("decoder_stage1_conv1_gn")
    rng = np.random.default_rng(1)
    gamma, beta = rng.uniform(0.5, 2.0, 128), rng.normal(0, 1, 128)
    layer.set_weights([gamma.astype("float32"), beta.astype("float32")])
    probe = keras.Model(model.inputs, [model.get_layer("decoder_stage1_conv1").output,
                                       model.get_layer("decoder_stage1_conv1_relu").output])
    conv, relu = (np.asarray(v) for v in probe(images(2, 64), training=True))
    assert layer.epsilon == 1e-3  # Keras' default
    want = np.maximum(np_group_norm(conv, gamma, beta, 8, 1e-3), 0.0)
    np.testing.assert_allclose(relu, want, rtol=1e-4, atol=1e-4)
    # no moving statistics: the layer gives the same in training and inference mode (the
    # block as a whole does not: SpatialDropout2D precedes the conv)
    np.testing.assert_array_equal(np.asarray(layer(conv, training=False)),
                                  np.asarray(layer(conv, training=True)))


def test_group_norm_unetpp_under_mixed_precision_saves_and_loads(keras, unet, tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = unet.build_model(ModelConfig(encoder="resnet18", encoder_weights="none",
                                             norm="group", decoder="unetpp",
                                             decoder_filters=(32, 16, 16, 8, 8)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    gn = [layer for layer in model.layers if isinstance(layer, keras.layers.GroupNormalization)]
    assert len(gn) == 2 * (10 + 1) and all(layer.compute_dtype == "float16" for layer in gn)
    x = images(1, 64)
    out = model(x, training=False)
    assert out["mask"].dtype == "float32" and out["mask"].shape == (1, 64, 64, 1)
    assert np.all(np.isfinite(np.asarray(out["mask"])))
    path = tmp_path / "unetpp_gn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    again = loaded(x, training=False)
    for key in ("mask", "label"):
        np.testing.assert_array_equal(np.asarray(again[key]), np.asarray(out[key]))


@pytest.mark.parametrize("overrides, key", [
    (["model.decoder=unet3"], "model.decoder"),
    (["model.norm=instance"], "model.norm"),
    (["model.norm=group", "model.decoder_filters=[256, 128, 64, 32, 12]"], "model.norm"),
])
def test_variant_model_keys_are_validated(unet, overrides, key):
    with pytest.raises(ConfigError, match=rf"^config key {key.replace('.', '[.]')}: ") as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)
    cfg = load_config(None, ["model.decoder=unetpp", "model.norm=group"]).model
    assert (cfg.decoder, cfg.norm) == ("unetpp", "group")
    # a ModelConfig made in code is not validated: build_model refuses it, before any weights
    for bad in ({"decoder": "fpn"}, {"norm": "layer"}):
        with pytest.raises(TfpneumoError, match=f"model.{next(iter(bad))}: "):
            unet.build_model(ModelConfig(encoder_weights="imagenet", **bad))
