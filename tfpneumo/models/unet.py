"""UNet or UNet++ on a segmentation-models ResNet encoder, with a classification head on the
bottleneck (``model.decoder``); the decoder's blocks use BatchNorm or GroupNorm (``model.norm``).

``build_model(cfg)`` is a pure function of :class:`~tfpneumo.config.ModelConfig`. The
encoder comes from segmentation-models' backbone factory (sm 1.0.1, which takes its
ResNets from ``classification_models``); the decoder and the head are ours: standard Keras
layers plus one registered layer (no Lambda), so a saved ``.keras`` file loads under
``safe_mode=True``.

Inputs and outputs::

    image  (B, H, W, 1)           grey pixels in [0, 255], uint8 or float, H and W multiples
                                  of 32. The model owns its input convention
                                  (:class:`~tfpneumo.models.layers.GreyPixels`, recorded in
                                  saved files): it repeats grey to RGB, and sm's ResNets
                                  normalise inside (their first layer is a
                                  BatchNormalization, ``bn_data``, whose ImageNet weights
                                  hold ImageNet's 0..255 RGB statistics).
    mask   (B, H, W, 1) float32   pixel probabilities (sigmoid), float32 under any policy.
    label  (B, 1)       float32   probability that the image has a pneumothorax.

Every layer we add has a fixed name (``decoder_stage{i}_conv1``, ``cls_head_dense``, ...);
the encoder keeps sm's names (``conv0``, ``stage3_unit2_bn1``, ...), so weights load by name.
Two custom layers, :class:`~tfpneumo.models.layers.GreyPixels` and
:class:`~tfpneumo.models.layers.BilinearUpSampling2D` (registered): load saved networks with
:func:`tfpneumo.models.saved.load_network`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from tfpneumo.config import GROUP_NORM_GROUPS
from tfpneumo.errors import TfpneumoError
from tfpneumo.models import layers as _custom_layers  # noqa: F401  (registers them for loading)

if TYPE_CHECKING:
    import keras

    from tfpneumo.config import ModelConfig

# Skip taps, deepest first: x16, x8, x4, x2 (times smaller than the input). sm's own table
# (backbones_factory._default_feature_layers) takes them after the pre-activation ReLU.
SKIP_TAPS: dict[str, tuple[str, ...]] = {
    "resnet18": ("stage4_unit1_relu1", "stage3_unit1_relu1", "stage2_unit1_relu1", "relu0"),
    "resnet34": ("stage4_unit1_relu1", "stage3_unit1_relu1", "stage2_unit1_relu1", "relu0"),
    "resnet50": ("stage4_unit1_relu1", "stage3_unit1_relu1", "stage2_unit1_relu1", "relu0"),
}
# plain_taps: the same points one layer earlier, the BatchNormalization that feeds each ReLU
# (sm's ResNets are pre-activation: stageN_unit1_bn1 normalises the previous stage's sum).
# The Add layers themselves are unnamed in sm (add_17, ...), so the BN output is the first
# named non-ReLU tap.
PLAIN_SKIP_TAPS: dict[str, tuple[str, ...]] = {
    "resnet18": ("stage4_unit1_bn1", "stage3_unit1_bn1", "stage2_unit1_bn1", "bn0"),
    "resnet34": ("stage4_unit1_bn1", "stage3_unit1_bn1", "stage2_unit1_bn1", "bn0"),
    "resnet50": ("stage4_unit1_bn1", "stage3_unit1_bn1", "stage2_unit1_bn1", "bn0"),
}
# Channels of the taps above (both variants), deepest first.
SKIP_CHANNELS: dict[str, tuple[int, ...]] = {
    "resnet18": (256, 128, 64, 64),
    "resnet34": (256, 128, 64, 64),
    "resnet50": (1024, 512, 256, 64),
}
# The encoder's last layer (x32): input of the decoder and of the classification head.
ENCODER_OUTPUT = "relu1"
BOTTLENECK_CHANNELS: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}

# ImageNet's RGB statistics in [0, 1]: where a random encoder's input BatchNorm starts.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SCSE_REDUCTION = 16  # channel squeeze ratio of the cSE branch (smp's SCSEModule default)
HEAD_POOLS = ("avg", "avgmax")


def skip_taps(encoder: str, plain: bool = False) -> tuple[str, ...]:
    """Layer names of the 4 skip taps of ``encoder``, deepest (x16) first."""
    table = PLAIN_SKIP_TAPS if plain else SKIP_TAPS
    if encoder not in table:
        raise TfpneumoError(f"model.encoder: {encoder!r} is not one of {sorted(table)}")
    return table[encoder]


# ----------------------------------------------------------------------------- encoder

def _keras():
    """keras, with TensorFlow imported quietly first."""
    from tfpneumo.tfimport import quiet_tensorflow

    quiet_tensorflow()
    import keras

    return keras


def _sm():
    """segmentation_models, imported after ``tfpneumo`` has set SM_FRAMEWORK=tf.keras."""
    _keras()
    with contextlib.redirect_stdout(io.StringIO()):  # sm prints its framework on import
        import segmentation_models as sm

        if sm.framework() != "tf.keras":  # imported before tfpneumo with another framework
            sm.set_framework("tf.keras")
    return sm


def build_backbone(encoder: str, image: keras.KerasTensor) -> keras.Model:
    """sm's ResNet on the input tensor ``image``, randomly initialised, without its top."""
    skip_taps(encoder)  # validates the name
    from tfpneumo.compat import sm_keras_modules

    sm = _sm()
    modules = sm_keras_modules(sm)
    modules["layers"] = _LayersWithFusedBatchNorm(modules["layers"])
    return sm.Backbones.get_backbone(encoder, input_tensor=image, weights=None,
                                     include_top=False, **modules)


class _LayersWithFusedBatchNorm:
    """``keras.layers`` as segmentation-models builds its ResNets from, with
    :class:`~tfpneumo.models.layers.FusedBatchNorm` as its BatchNormalization."""

    def __init__(self, base):
        from tfpneumo.models.layers import FusedBatchNorm

        self._base = base
        self.BatchNormalization = FusedBatchNorm

    def __getattr__(self, name: str):
        return getattr(self._base, name)


def imagenet_weights_entry(encoder: str) -> dict:
    """sm's record of the ImageNet no-top weights of ``encoder``: name, url, md5."""
    from classification_models.weights import WEIGHTS_COLLECTION

    for entry in WEIGHTS_COLLECTION:
        if (entry["model"], entry["dataset"], entry["include_top"]) == (encoder, "imagenet",
                                                                         False):
            return entry
    raise TfpneumoError(f"model.encoder: segmentation-models has no ImageNet weights for "
                        f"{encoder!r}")


def keras_cache_dir() -> Path:
    """Where ``keras.utils.get_file`` caches downloads: ``$KERAS_HOME`` or ``~/.keras``."""
    home = os.environ.get("KERAS_HOME")
    if not home:
        from tfpneumo.compat import keras_home

        return keras_home()
    return Path(home).expanduser()


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_imagenet_weights(encoder: str) -> Path:
    """The cached ImageNet weights file of ``encoder``, downloaded (md5-checked) if missing.

    Same file, URL, md5 and cache folder as sm's ``weights="imagenet"``; we fetch it
    ourselves to give a one-line error offline and to refuse (not delete) a cached file
    whose md5 is wrong, which ``keras.utils.get_file`` would try to re-download and remove.
    """
    keras = _keras()
    entry = imagenet_weights_entry(encoder)
    folder = keras_cache_dir() / "models"
    target = folder / entry["name"]
    where = f"put {entry['name']} (from {entry['url']}, md5 {entry['md5']}) in {folder}/"
    if target.exists():
        found = _md5(target)
        if found != entry["md5"]:
            raise TfpneumoError(f"model.encoder_weights=imagenet: {target} has md5 {found}, "
                                f"expected {entry['md5']}; {where}")
        return target
    try:
        path = keras.utils.get_file(entry["name"], entry["url"], cache_subdir="models",
                                    md5_hash=entry["md5"], cache_dir=str(keras_cache_dir()))
    except Exception as e:  # get_file raises a bare Exception on URL errors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TfpneumoError(f"model.encoder_weights=imagenet: download failed ({reason}); "
                            f"offline, {where}") from e
    return Path(path)


def _h5_weighted_layer_names(path: Path) -> set[str]:
    """Names of the layers that hold weights in a legacy Keras ``.h5`` weights file."""
    import h5py

    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
        names = [n.decode() if isinstance(n, bytes) else str(n)
                 for n in group.attrs.get("layer_names", [])]
        return {n for n in names if n in group and len(group[n].attrs.get("weight_names", []))}


def load_encoder_weights(backbone: keras.Model, path: str | Path, what: str,
                         encoder: str = "encoder") -> None:
    """Loads weights into the encoder ``backbone``, or raises a one-line TfpneumoError.

    ``.weights.h5`` (Keras 3, e.g. ``encoder_model(model).save_weights(...)``) loads by the
    encoder's structure; it must come from the same encoder. A legacy ``.h5`` (Keras 2, the
    format of sm's ImageNet files) loads by layer name, and every encoder layer that holds
    weights must be in the file. A load that Keras completes while skipping parts of the
    encoder (it only warns) is an error too.
    """
    path = Path(path)
    if not path.is_file():
        raise TfpneumoError(f"{what}: {path} not found")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if path.name.endswith(".weights.h5"):
                backbone.load_weights(str(path))
            elif path.suffix in (".h5", ".hdf5"):
                wanted = {layer.name for layer in backbone.layers if layer.weights}
                missing = sorted(wanted - _h5_weighted_layer_names(path))
                if missing:
                    raise TfpneumoError(f"{what}: {path} has no weights for {len(missing)} "
                                        f"{encoder} layers (e.g. {missing[0]}); is it a "
                                        f"{encoder} file?")
                backbone.load_weights(str(path), by_name=True)
            else:
                raise TfpneumoError(f"{what}: {path} is not a .weights.h5 or .h5 weights file")
    except TfpneumoError:
        raise
    except Exception as e:  # h5py OSError, keras ValueError on a mismatch
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 240 else reason[:240] + "..."
        raise TfpneumoError(f"{what}: cannot load {path} into the {encoder} encoder "
                            f"({reason or type(e).__name__})") from e
    skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
    if skipped:
        raise TfpneumoError(f"{what}: {path} does not match the {encoder} encoder "
                            f"({' '.join(skipped[0].split())[:200]})")


# ----------------------------------------------------------------------------- decoder

def _conv_bn_relu(x, filters: int, name: str, norm: str = "batch"):
    """Conv 3x3 (no bias, a norm follows) -> BatchNormalization (``name_bn``) or GroupNormalization
    with :data:`GROUP_NORM_GROUPS` groups (``name_gn``) -> ReLU, layers ``name*``."""
    from keras import layers

    from tfpneumo.models.layers import FusedBatchNorm

    x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                      kernel_initializer="he_uniform", name=name)(x)
    if norm == "group":
        x = layers.GroupNormalization(GROUP_NORM_GROUPS, name=f"{name}_gn")(x)
    else:
        x = FusedBatchNorm(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _scse(x, channels: int, name: str):
    """Concurrent spatial and channel squeeze & excitation (Roy et al., MICCAI 2018).

    ``x * cSE(x) + x * sSE(x)``: cSE gates channels from their global average (a bottleneck
    of ``channels // 16`` units), sSE gates pixels with a 1x1 conv. Built from standard layers.
    """
    from keras import layers

    c = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_cse_pool")(x)
    c = layers.Conv2D(max(channels // SCSE_REDUCTION, 1), 1, activation="relu",
                      name=f"{name}_cse_reduce")(c)
    c = layers.Conv2D(channels, 1, activation="sigmoid", name=f"{name}_cse_expand")(c)
    c = layers.Multiply(name=f"{name}_cse_scale")([x, c])
    s = layers.Conv2D(1, 1, activation="sigmoid", name=f"{name}_sse_conv")(x)
    s = layers.Multiply(name=f"{name}_sse_scale")([x, s])
    return layers.Add(name=f"{name}_scse")([c, s])


def _decoder_stage(x, skips: list, filters: int, name: str, cfg: ModelConfig):
    """Bilinear x2 upsampling, [concat with skips, SpatialDropout2D], 2 x Conv-norm-ReLU, [scSE].

    One UNet stage (one skip) or one UNet++ node (all the earlier nodes of its level).
    """
    from keras import layers

    from tfpneumo.models.layers import BilinearUpSampling2D

    # not UpSampling2D(interpolation="bilinear"): it fails on symbolic H, W in Keras 3.15
    x = BilinearUpSampling2D(2, name=f"{name}_upsample")(x)
    if skips:
        x = layers.Concatenate(name=f"{name}_concat")([x, *skips])
        if cfg.skip_dropout > 0:
            x = layers.SpatialDropout2D(cfg.skip_dropout, name=f"{name}_dropout")(x)
    x = _conv_bn_relu(x, filters, f"{name}_conv1", cfg.norm)
    x = _conv_bn_relu(x, filters, f"{name}_conv2", cfg.norm)
    if cfg.attention == "scse":
        x = _scse(x, filters, name)
    return x


def _unet_decoder(bottleneck, taps: list, cfg: ModelConfig):
    """UNet: stage i upsamples stage i-1 and takes skip tap i (deepest first); stage 4 none."""
    x = bottleneck
    for stage, (filters, skip) in enumerate(zip(cfg.decoder_filters, [*taps, None], strict=True)):
        x = _decoder_stage(x, [] if skip is None else [skip], filters, f"decoder_stage{stage}", cfg)
    return x


def _unetpp_decoder(bottleneck, taps: list, cfg: ModelConfig):
    """UNet++ (Zhou et al., DLMIA 2018), nested dense skip pathways, without deep supervision.

    Level i is the encoder's x2^(i+1) output: X^{i,0} is the skip tap (i = 0: x2 ... 3: x16)
    and X^{4,0} the bottleneck. Node X^{i,j} (j >= 1, i + j <= 4), layers ``decoder_x{i}_{j}_*``,
    concatenates upsampled X^{i+1,j-1} with X^{i,0}, ..., X^{i,j-1}, and has the filters of
    the UNet stage at its resolution (``decoder_filters[3 - i]``). X^{0,4} (x2) goes through
    ``decoder_final`` (x1, ``decoder_filters[4]``, no skip), as the UNet's last stage.
    """
    levels = len(taps)
    nodes = {(i, 0): tap for i, tap in enumerate(reversed(taps))}
    nodes[(levels, 0)] = bottleneck
    for j in range(1, levels + 1):
        for i in range(levels + 1 - j):
            nodes[(i, j)] = _decoder_stage(nodes[(i + 1, j - 1)], [nodes[(i, k)] for k in range(j)],
                                           cfg.decoder_filters[levels - 1 - i], f"decoder_x{i}_{j}", cfg)
    return _decoder_stage(nodes[(0, levels)], [], cfg.decoder_filters[levels], "decoder_final", cfg)


def _head(x, cfg: ModelConfig):
    """Global pooling of the bottleneck -> Dropout -> Dense(1) -> sigmoid: (B, 1) float32."""
    from keras import layers

    # ModelConfig has no head_pool key yet; read it this way so adding one needs no change here.
    pool = cfg.head_pool
    if pool not in HEAD_POOLS:
        raise TfpneumoError(f"model.head_pool: {pool!r} is not one of {list(HEAD_POOLS)}")
    h = layers.GlobalAveragePooling2D(name="cls_head_avgpool")(x)
    if pool == "avgmax":
        m = layers.GlobalMaxPooling2D(name="cls_head_maxpool")(x)
        h = layers.Concatenate(name="cls_head_concat")([h, m])
    h = layers.Dropout(cfg.head_dropout, name="cls_head_dropout")(h)
    h = layers.Dense(1, name="cls_head_dense")(h)
    return layers.Activation("sigmoid", dtype="float32", name="label")(h)


# ----------------------------------------------------------------------------- model

def build_model(cfg: ModelConfig, *, input_shape: tuple = (None, None, 1)) -> keras.Model:
    """The UNet with outputs ``{"mask": (B, H, W, 1), "label": (B, 1)}``, both float32.

    Layers are created under the current global dtype policy (``mixed_float16`` and
    ``mixed_bfloat16`` work); the two final sigmoids always compute in float32.
    ``cfg.encoder_weights``: ``none`` (random), ``imagenet`` (sm's file, downloaded into
    ``~/.keras/models/`` on first use) or a path to a ``.weights.h5`` / ``.h5`` file.
    Raises TfpneumoError (one line) on an unknown encoder, a fixed input size that is not a
    multiple of 32, or weights that cannot be found or loaded.
    """
    keras = _keras()
    from keras import layers

    taps = skip_taps(cfg.encoder, cfg.plain_taps)
    if len(input_shape) != 3 or input_shape[-1] != 1:
        raise TfpneumoError(f"input_shape {input_shape}: expected (H, W, 1), grey pixels")
    for size in input_shape[:2]:
        if size is not None and size % 32:
            raise TfpneumoError(f"input_shape {input_shape}: H and W must be multiples of 32 "
                                "(the encoder downsamples 5 times)")
    if len(cfg.decoder_filters) != len(taps) + 1:
        raise TfpneumoError(f"model.decoder_filters: expected {len(taps) + 1} values")
    decoder = {"unet": _unet_decoder, "unetpp": _unetpp_decoder}.get(cfg.decoder)
    if decoder is None:
        raise TfpneumoError(f"model.decoder: {cfg.decoder!r} is not one of ['unet', 'unetpp']")
    if cfg.norm not in ("batch", "group"):
        raise TfpneumoError(f"model.norm: {cfg.norm!r} is not one of ['batch', 'group']")

    from tfpneumo.models.layers import GreyPixels

    image = keras.Input(shape=input_shape, name="image")
    pixels = GreyPixels(name="grey_pixels")(image)
    backbone = build_backbone(cfg.encoder, pixels)
    weights = cfg.encoder_weights
    if weights.lower() == "imagenet":
        load_encoder_weights(backbone, fetch_imagenet_weights(cfg.encoder),
                             "model.encoder_weights=imagenet", cfg.encoder)
    elif weights.lower() != "none":
        load_encoder_weights(backbone, weights, "model.encoder_weights", cfg.encoder)
    else:
        # A random encoder's input BatchNorm starts at mean 0 / variance 1, so in inference
        # mode raw pixels would flow on unnormalised (and overflow float16). Start it where the
        # ImageNet weights have it: the pixel statistics of ImageNet.
        import numpy as np

        bn_data = backbone.get_layer("bn_data")
        bn_data.moving_mean.assign(np.array(IMAGENET_MEAN, "float32") * 255.0)
        bn_data.moving_variance.assign((np.array(IMAGENET_STD, "float32") * 255.0) ** 2)

    x = backbone.get_layer(ENCODER_OUTPUT).output
    label = _head(x, cfg)
    skips = [backbone.get_layer(name).output for name in taps]
    x = decoder(x, skips, cfg)
    prior = math.log(cfg.mask_prior / (1.0 - cfg.mask_prior))
    x = layers.Conv2D(1, 1, name="mask_logits",
                      bias_initializer=keras.initializers.Constant(prior))(x)
    mask = layers.Activation("sigmoid", dtype="float32", name="mask")(x)
    model = keras.Model(image, {"mask": mask, "label": label}, name=f"{cfg.decoder}_{cfg.encoder}")
    # sm's 0.99 needs thousands of steps; short runs want less. With norm: group these are the
    # encoder's BatchNorms only (kept: they hold the ImageNet statistics).
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = cfg.bn_momentum
            # read at call time: the moments are all-reduced over the replicas in training
            layer.synchronized = cfg.sync_batchnorm
    return model


# ----------------------------------------------------------------------------- encoder access

def encoder_model(model: keras.Model) -> keras.Model:
    """The encoder part of a built (or loaded) UNet as a model sharing its layers.

    ``(B, H, W, 1) -> (B, H/32, W/32, C)``. Its ``save_weights("x.weights.h5")`` gives a file
    that ``encoder_weights: x.weights.h5`` loads.
    """
    import keras

    return keras.Model(model.inputs, model.get_layer(ENCODER_OUTPUT).output,
                       name=f"{model.name}_encoder")


def encoder_layers(model: keras.Model) -> list[keras.Layer]:
    """The encoder's layers of ``model``, in model order (no input layer).

    Found from the graph (every layer between the input and ``relu1``), because sm leaves
    its ZeroPadding2D and Add layers unnamed (``add_17``), so no name prefix identifies them.
    """
    import keras

    ids = {id(layer) for layer in encoder_model(model).layers}
    return [layer for layer in model.layers
            if id(layer) in ids and not isinstance(layer, keras.layers.InputLayer)]


def set_encoder_trainable(model: keras.Model, trainable: bool) -> None:
    """Freezes (False) or unfreezes (True) the encoder in place.

    In Keras 3 a BatchNormalization with ``trainable=False`` runs in inference mode (moving
    statistics used and left unchanged). Compile the model again after calling this.
    """
    for layer in encoder_layers(model):
        layer.trainable = trainable
