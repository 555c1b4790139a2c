"""UNet model: outputs under each dtype policy, skip taps, save/load, freezing, encoder weights."""

from __future__ import annotations

import dataclasses
import hashlib
import urllib.error
from pathlib import Path

import numpy as np
import pytest

import tfpneumo  # noqa: F401  (sets SM_FRAMEWORK before segmentation_models is imported)
from tfpneumo import TfpneumoError
from tfpneumo.config import ModelConfig

# ResNet facts (He et al. 2016; sm's pre-activation ResNets): channels at x16, x8, x4, x2
# and at the x32 bottleneck. resnet18/34 use basic blocks, resnet50 bottleneck blocks (x4).
DOCUMENTED = {
    "resnet18": ((256, 128, 64, 64), 512),
    "resnet34": ((256, 128, 64, 64), 512),
    "resnet50": ((1024, 512, 256, 64), 2048),
}


@pytest.fixture(scope="module")
def unet():
    from tfpneumo.models import unet

    return unet


def images(b: int = 2, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """(B, H, W, 1) float32 grey pixels in [0, 255]: what the model takes."""
    return np.random.default_rng(seed).uniform(0, 255, (b, h, w, 1)).astype("float32")


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"encoder_weights": "none", **kw})


@pytest.fixture(scope="module")
def model34(keras, unet):
    """The default layout (resnet34, scSE, ReLU taps), random init, float32."""
    return unet.build_model(cfg())


@pytest.fixture(scope="module")
def model18(keras, unet):
    return unet.build_model(cfg(encoder="resnet18"))


def weights_by_layer(layers) -> dict[str, list[np.ndarray]]:
    return {layer.name: [w.numpy() for w in layer.weights] for layer in layers if layer.weights}


def write_legacy_h5(path: Path, layers, reverse: bool = False) -> None:
    """A Keras 2 ``save_weights`` file (the format of sm's ImageNet files), written by hand.

    ``reverse`` stores the layers in reverse order, so only a by-name loader gets it right.
    """
    import h5py

    layers = [layer for layer in layers if layer.weights][:: -1 if reverse else 1]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([layer.name.encode() for layer in layers])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in layers:
            group = f.create_group(layer.name)
            # Keras 2 order: trainable weights, then non-trainable (BN: gamma, beta, mean, var)
            values = [w.numpy() for w in layer.trainable_weights + layer.non_trainable_weights]
            names = [f"{layer.name}/w{i}" for i in range(len(values))]
            group.attrs["weight_names"] = np.array([n.encode() for n in names])
            for name, value in zip(names, values, strict=True):
                group.create_dataset(name, data=value)


# ----------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_outputs_float32_under_each_policy(keras, unet, policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = unet.build_model(cfg(encoder="resnet18"))
        compute = keras.mixed_precision.global_policy().compute_dtype
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # the policy did reach our layers and sm's
    assert model.get_layer("decoder_stage0_conv1").compute_dtype == compute
    assert model.get_layer("conv0").compute_dtype == compute
    out = model(images(), training=False)
    assert set(out) == {"mask", "label"}
    assert tuple(out["mask"].shape) == (2, 64, 64, 1)
    assert tuple(out["label"].shape) == (2, 1)
    for value in out.values():
        assert value.dtype == "float32"
        v = np.asarray(value)
        assert np.all((v >= 0) & (v <= 1))


def test_outputs_and_other_input_size(model34):
    assert sorted(model34.output_names) == ["label", "mask"]
    assert model34.input.shape[1:] == (None, None, 1)
    out = model34.predict(images(2, 96, 128), verbose=0)  # fully convolutional
    assert out["mask"].shape == (2, 96, 128, 1) and out["mask"].dtype == np.float32
    assert out["label"].shape == (2, 1) and out["label"].dtype == np.float32


def test_several_input_sizes_and_dynamic_signature(tf, model18):
    # a third size makes predict retrace with H, W = None, where Keras 3.15's bilinear
    # UpSampling2D fails; ours must not
    for h, w in ((32, 32), (64, 32), (32, 96)):
        out = model18.predict(images(1, h, w), verbose=0)
        assert out["mask"].shape == (1, h, w, 1)
    serve = tf.function(lambda x: model18(x, training=False),
                        input_signature=[tf.TensorSpec((None, None, None, 1), tf.float32)])
    out = serve(images(1, 32, 96))
    assert tuple(out["mask"].shape) == (1, 32, 96, 1)


def test_bilinear_upsampling_layer(tf, keras):
    from tfpneumo.models.layers import BilinearUpSampling2D

    # hand-worked, half-pixel centres with edge clamping: [0, 4] -> [0, 1, 3, 4]
    x = np.array([0.0, 4.0], "float32").reshape(1, 1, 2, 1)
    got = np.asarray(BilinearUpSampling2D(2)(x))
    np.testing.assert_allclose(got[0, :, :, 0], [[0, 1, 3, 4]] * 2)
    # same values as Keras' own bilinear UpSampling2D on a static shape
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype("float32")
    want = keras.layers.UpSampling2D(2, interpolation="bilinear")(x)
    np.testing.assert_allclose(np.asarray(BilinearUpSampling2D(2)(x)), np.asarray(want),
                               atol=1e-6)
    # keeps a half-precision dtype; config round trip
    layer = BilinearUpSampling2D(3, dtype="mixed_float16", name="up")
    assert layer(x).dtype == "float16" and tuple(layer(x).shape) == (2, 15, 21, 3)
    clone = BilinearUpSampling2D.from_config(layer.get_config())
    assert clone.size == 3 and clone.name == "up"
    assert layer.compute_output_shape((None, None, 4, 3)) == (None, None, 12, 3)


def test_fixed_size_not_multiple_of_32_is_refused(unet):
    with pytest.raises(TfpneumoError, match="multiples of 32"):
        unet.build_model(cfg(), input_shape=(100, 96, 1))
    with pytest.raises(TfpneumoError, match="grey pixels"):
        unet.build_model(cfg(), input_shape=(64, 64, 3))


def test_parameter_count_matches_encoder_plus_decoder(model34, unet, keras):
    # Encoder: sm's resnet34 without top (21,302,473 params, built independently here).
    backbone = unet.build_backbone("resnet34", keras.Input((None, None, 3)))
    assert backbone.count_params() == 21_302_473
    encoder = sum(w.numpy().size for layer in unet.encoder_layers(model34) for w in layer.weights)
    assert encoder == backbone.count_params()

    # Decoder and heads by hand: conv3x3 (no bias) + BN (4 per channel), scSE, 1x1 mask conv.
    def block(cin, f):
        conv = 9 * cin * f + 4 * f + 9 * f * f + 4 * f
        r = max(f // 16, 1)
        scse = (f * r + r) + (r * f + f) + (f + 1)
        return conv + scse

    ins = [512 + 256, 256 + 128, 128 + 64, 64 + 64, 32]
    decoder = sum(block(c, f) for c, f in zip(ins, (256, 128, 64, 32, 16), strict=True))
    heads = (16 + 1) + (512 + 1)
    assert model34.count_params() == encoder + decoder + heads


# ----------------------------------------------------------------------------- taps

@pytest.mark.parametrize("encoder", sorted(DOCUMENTED))
def test_skip_tap_tables(keras, unet, encoder):
    backbone = unet.build_backbone(encoder, keras.Input((64, 64, 3)))
    channels, bottleneck = DOCUMENTED[encoder]
    assert unet.SKIP_CHANNELS[encoder] == channels
    assert unet.BOTTLENECK_CHANNELS[encoder] == bottleneck
    assert backbone.get_layer(unet.ENCODER_OUTPUT).output.shape == (None, 2, 2, bottleneck)
    for plain in (False, True):
        taps = unet.skip_taps(encoder, plain)
        for name, c, size in zip(taps, channels, (4, 8, 16, 32), strict=True):
            layer = backbone.get_layer(name)
            assert layer.output.shape == (None, size, size, c), name
            kind = keras.layers.BatchNormalization if plain else keras.layers.Activation
            assert isinstance(layer, kind), name
    # the plain tap is the BN that feeds the ReLU tap of the same position
    for relu, bn in zip(unet.skip_taps(encoder), unet.skip_taps(encoder, True), strict=True):
        assert backbone.get_layer(relu).input is backbone.get_layer(bn).output


def test_plain_taps_without_attention(keras, unet, model34):
    model = unet.build_model(cfg(encoder="resnet18", attention="none", plain_taps=True))
    names = {layer.name for layer in model.layers}
    assert not any("scse" in n or "cse" in n for n in names)
    assert any(n.endswith("_scse") for n in (layer.name for layer in model34.layers))
    for stage, tap in enumerate(unet.skip_taps("resnet18", plain=True)):
        concat = model.get_layer(f"decoder_stage{stage}_concat")
        assert concat.input[1] is model.get_layer(tap).output
    out = model.predict(images(), verbose=0)
    assert out["mask"].shape == (2, 64, 64, 1)


def test_avgmax_head(unet):
    @dataclasses.dataclass(frozen=True)
    class WithPool(ModelConfig):  # the ModelConfig.head_pool key proposed to the lead
        head_pool: str = "avgmax"

    model = unet.build_model(WithPool(encoder="resnet18", encoder_weights="none",
                                      attention="none"))
    assert model.get_layer("cls_head_dense").kernel.shape == (512 * 2, 1)
    with pytest.raises(TfpneumoError, match="head_pool"):
        unet.build_model(WithPool(encoder="resnet18", encoder_weights="none", head_pool="max"))


# ----------------------------------------------------------------------------- save / freeze

def test_keras_save_load_round_trip(keras, unet, model18, tmp_path):
    x = images(seed=1)
    path = tmp_path / "unet.keras"
    model18.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    want, got = model18(x, training=False), loaded(x, training=False)
    for key in ("mask", "label"):
        assert got[key].dtype == "float32"
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model18.layers]
    assert {layer.name for layer in unet.encoder_layers(loaded)} == {
        layer.name for layer in unet.encoder_layers(model18)}


def test_model_takes_grey_pixels_and_normalises_inside(keras, unet, model18):
    """Oracle: segmentation-models' own ResNet (built apart, same weights) on the grey image
    repeated to RGB 0..255 gives the encoder output; uint8 input equals its float32 values."""
    sm_backbone = unet.build_backbone("resnet18", keras.Input((None, None, 3)))
    for layer in sm_backbone.layers:
        if layer.weights:
            layer.set_weights(model18.get_layer(layer.name).get_weights())
    grey = np.random.default_rng(5).integers(0, 256, (2, 64, 64, 1)).astype(np.uint8)
    want = sm_backbone(np.repeat(grey, 3, axis=-1).astype("float32"), training=False)
    got = unet.encoder_model(model18)(grey, training=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    as_float = model18(grey.astype("float32"), training=False)
    as_uint8 = model18(grey, training=False)
    np.testing.assert_array_equal(np.asarray(as_uint8["mask"]), np.asarray(as_float["mask"]))


def test_freeze_encoder(keras, unet, model18):
    def n_trainable(model):
        return sum(w.numpy().size for w in model.trainable_weights)

    sm_backbone = unet.build_backbone("resnet18", keras.Input((None, None, 3)))
    sm_weighted = {layer.name for layer in sm_backbone.layers if layer.weights}
    sm_trainable = sum(w.numpy().size for w in sm_backbone.trainable_weights)
    enc = unet.encoder_layers(model18)
    assert {layer.name for layer in enc if layer.weights} == sm_weighted
    assert not any(layer.name.startswith(("decoder", "cls_head", "mask")) for layer in enc)

    before = n_trainable(model18)
    unet.set_encoder_trainable(model18, False)
    try:
        assert n_trainable(model18) == before - sm_trainable
        owners = {layer.name for layer in model18.layers for w in layer.trainable_weights}
        assert not owners & sm_weighted
        # a frozen BatchNormalization runs in inference mode: its statistics stay put,
        # while the decoder's move in a training-mode call
        bn_enc, bn_dec = model18.get_layer("bn0"), model18.get_layer("decoder_stage0_conv1_bn")
        enc0, dec0 = bn_enc.moving_mean.numpy(), bn_dec.moving_mean.numpy()
        model18(images(), training=True)
        np.testing.assert_array_equal(bn_enc.moving_mean.numpy(), enc0)
        assert not np.allclose(bn_dec.moving_mean.numpy(), dec0)
    finally:
        unet.set_encoder_trainable(model18, True)
    assert n_trainable(model18) == before


# ----------------------------------------------------------------------------- weights

def test_weights_path_branch(unet, model18, model34, tmp_path):
    src = tmp_path / "encoder.weights.h5"
    unet.encoder_model(model18).save_weights(src)
    model = unet.build_model(cfg(encoder="resnet18", encoder_weights=str(src)))
    want = weights_by_layer(unet.encoder_layers(model18))
    got = weights_by_layer(unet.encoder_layers(model))
    assert got.keys() == want.keys() and len(got) > 30
    for name in want:
        for a, b in zip(got[name], want[name], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
    # the decoder was not loaded: it stays randomly initialised
    a = model.get_layer("decoder_stage0_conv1").kernel.numpy()
    assert not np.array_equal(a, model18.get_layer("decoder_stage0_conv1").kernel.numpy())

    # a legacy Keras 2 .h5 with the layers in reverse order loads by name
    legacy = tmp_path / "encoder.h5"
    write_legacy_h5(legacy, unet.encoder_layers(model18), reverse=True)
    model = unet.build_model(cfg(encoder="resnet18", encoder_weights=str(legacy)))
    got = weights_by_layer(unet.encoder_layers(model))
    for name in want:
        for a, b in zip(got[name], want[name], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)

    # errors: missing file, another encoder's file, legacy file lacking layers, bad suffix
    src34 = tmp_path / "r34.weights.h5"
    unet.encoder_model(model34).save_weights(src34)
    partial = tmp_path / "partial.h5"
    write_legacy_h5(partial, unet.encoder_layers(model18)[:10])
    bad = tmp_path / "enc.npz"
    bad.write_bytes(b"x")
    cases = [(tmp_path / "nope.weights.h5", "not found"), (src34, "cannot load"),
             (partial, "has no weights for"), (bad, "not a .weights.h5 or .h5")]
    for path, message in cases:
        with pytest.raises(TfpneumoError, match=message) as err:
            unet.build_model(cfg(encoder="resnet18", encoder_weights=str(path)))
        assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_imagenet_offline_error(unet, monkeypatch, tmp_path):
    import keras.src.utils.file_utils as file_utils

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "urlretrieve", offline)  # offline even where there is network
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    url = ("https://github.com/qubvel/classification_models/releases/download/0.0.1/"
           "resnet18_imagenet_1000_no_top.h5")
    with pytest.raises(TfpneumoError) as err:
        unet.build_model(cfg(encoder="resnet18", encoder_weights="imagenet"))
    message = str(err.value)
    assert "\n" not in message
    assert f"resnet18_imagenet_1000_no_top.h5 (from {url}" in message
    assert f"in {tmp_path / 'models'}/" in message
    assert "Name or service not known" in message

    # a cached file with the wrong md5 is refused and kept (keras would delete it)
    cached = tmp_path / "models" / "resnet18_imagenet_1000_no_top.h5"
    cached.write_bytes(b"not weights")
    with pytest.raises(TfpneumoError, match="has md5 ") as err:
        unet.build_model(cfg(encoder="resnet18", encoder_weights="imagenet"))
    assert "\n" not in str(err.value) and cached.exists()


def test_imagenet_from_cache(unet, model18, monkeypatch, tmp_path):
    """A file with sm's name and md5 in $KERAS_HOME/models is used without network.

    We cannot ship the real file, so we write a Keras 2 weights file and give sm's table
    its md5.
    """
    from classification_models import weights as cm_weights

    entry = unet.imagenet_weights_entry("resnet18")
    cached = tmp_path / "models" / entry["name"]
    cached.parent.mkdir()
    write_legacy_h5(cached, unet.encoder_layers(model18))
    monkeypatch.setitem(entry, "md5", hashlib.md5(cached.read_bytes()).hexdigest())
    assert entry in cm_weights.WEIGHTS_COLLECTION
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    model = unet.build_model(cfg(encoder="resnet18", encoder_weights="imagenet"))
    want = weights_by_layer(unet.encoder_layers(model18))
    got = weights_by_layer(unet.encoder_layers(model))
    for name in want:
        for a, b in zip(got[name], want[name], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_mask_prior_sets_the_initial_bias(unet):
    """RetinaNet's prior initialisation: bias log(p / (1 - p)); 0.5 is a zero bias."""
    import math

    (bias,) = [w for w in unet.build_model(cfg(encoder="resnet18", mask_prior=0.2))
               .get_layer("mask_logits").get_weights()[1:]]
    np.testing.assert_allclose(bias, [math.log(0.2 / 0.8)], rtol=1e-6)  # -1.386294
    default = unet.build_model(cfg(encoder="resnet18")).get_layer("mask_logits").get_weights()[1]
    np.testing.assert_allclose(default, [-4.59512], rtol=1e-5)  # log(0.01 / 0.99), the default
    assert unet.build_model(cfg(encoder="resnet18", mask_prior=0.5)) \
        .get_layer("mask_logits").get_weights()[1] == 0
    with pytest.raises(TfpneumoError, match="mask_prior"):
        from tfpneumo.config import load_config

        load_config(None, ["model.mask_prior=1.0"])
