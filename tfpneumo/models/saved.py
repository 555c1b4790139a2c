"""Loading a saved network: ``.keras`` files of this tfpneumo, or a one-line refusal.

A ``.keras`` file is a zip whose ``config.json`` holds the model graph. Networks of this
version carry their input convention in a :class:`~tfpneumo.models.layers.GreyPixels` layer;
files of tfpneumo < 0.3 took ImageNet-normalised RGB (their first layer is a Rescaling named
``imagenet_to_pixels``) and would silently predict garbage on pixels, so they are refused
before Keras builds anything.

The archive's members are checked before anything in it is read (a ``config.json`` that is a
zip bomb would exhaust memory): their declared uncompressed sizes (:data:`MAX_TOTAL_BYTES` in
all, :data:`MAX_JSON_BYTES` for the JSON members), their number and their compression ratio.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from tfpneumo.errors import TfpneumoError, first_line

MAX_TOTAL_BYTES = 4 << 30  # a resnet50 UNet with its optimizer-free weights: ~150 MB
MAX_JSON_BYTES = 16 << 20  # config.json of a resnet34 UNet: ~150 KB
MAX_MEMBERS = 1000  # Keras writes 3 (metadata.json, config.json, model.weights.h5)
# Deflate's best ratio is ~1032:1 (a run of zeros); weights and JSON stay far below this.
MAX_RATIO = 100
_RATIO_FROM = 1 << 20  # small members may compress well (repetitive JSON)


def check_archive(path: Path, z: zipfile.ZipFile) -> None:
    """Refuses, naming ``path``, an archive whose declared sizes would let reading it (or Keras
    loading it) allocate without bound. Reads only the zip's central directory."""
    members = z.infolist()
    if len(members) > MAX_MEMBERS:
        raise TfpneumoError(f"{path}: {len(members)} archive members (a .keras file has a "
                            f"few; limit {MAX_MEMBERS}); refused")
    total = 0
    for m in members:
        name = m.filename if len(m.filename) <= 80 else m.filename[:80] + "..."
        limit = MAX_JSON_BYTES if m.filename.endswith(".json") else MAX_TOTAL_BYTES
        if m.file_size > limit:
            raise TfpneumoError(f"{path}: archive member {name} declares {m.file_size} bytes "
                                f"uncompressed (limit {limit}); refused")
        if m.compress_type == zipfile.ZIP_STORED and m.file_size != m.compress_size:
            raise TfpneumoError(f"{path}: archive member {name} is stored uncompressed but "
                                f"declares {m.file_size} bytes in {m.compress_size}; refused")
        if m.file_size > _RATIO_FROM and m.file_size > MAX_RATIO * max(m.compress_size, 1):
            raise TfpneumoError(f"{path}: archive member {name} declares {m.file_size} bytes "
                                f"from {m.compress_size} compressed (ratio over {MAX_RATIO}); "
                                "refused")
        total += m.file_size
    if total > MAX_TOTAL_BYTES:
        raise TfpneumoError(f"{path}: archive members declare {total} bytes uncompressed in "
                            f"all (limit {MAX_TOTAL_BYTES}); refused")


def input_convention(path: Path) -> str | None:
    """The input convention recorded in the ``.keras`` file ``path``; None if it has none.

    Raises TfpneumoError if ``path`` is not a readable ``.keras`` zip with a config.json, or
    if its members' declared sizes are beyond the limits of :func:`check_archive`.
    """
    try:
        with zipfile.ZipFile(path) as z:
            check_archive(path, z)
            config = json.loads(z.read("config.json"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise TfpneumoError(f"{path}: cannot load model ({first_line(e, 200)})") from e
    # Valid JSON of any shape: only objects are looked into (a list or a number has no layers).
    model = config.get("config") if isinstance(config, dict) else None
    layers = model.get("layers") if isinstance(model, dict) else None
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise TfpneumoError(f"{path}: config.json is not a Keras model's config (a JSON object "
                            "with config.layers); not a tfpneumo network")
    for layer in layers:
        if isinstance(layer, dict) and layer.get("class_name") == "GreyPixels":
            layer_config = layer.get("config")
            convention = layer_config.get("convention") if isinstance(layer_config, dict) else None
            return convention if isinstance(convention, str) else "(unreadable)"
    return None


def _shape(shape) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def check_shapes(path: Path, net) -> None:
    """Refuses, naming ``path``, a network whose input is not one grey image ``(None, H, W, 1)``
    or whose ``mask`` / ``label`` outputs are not ``(None, H, W, 1)`` / ``(None, 1)``.

    The declared shapes are checked, then the network is traced symbolically (no computation)
    on a ``(1, H, W, 1)`` image (H = W = 64 when the input takes any size), which catches a
    mask of another size than its image (a decoder a level short) whatever was declared.
    """
    import keras

    inputs = getattr(net, "inputs", None) or []
    if len(inputs) != 1:
        raise TfpneumoError(f"{path}: the network takes {len(inputs)} inputs, a tfpneumo "
                            "network takes one grey image (None, H, W, 1)")
    image = tuple(inputs[0].shape)
    if len(image) != 4 or image[-1] != 1:
        raise TfpneumoError(f"{path}: input shape {_shape(image)}, a tfpneumo network takes "
                            "grey images (None, H, W, 1)")
    mask, label = tuple(net.output["mask"].shape), tuple(net.output["label"].shape)
    side = tuple(image[1:3])
    if len(mask) != 4 or mask[-1] != 1 or any(
            m is not None and i is not None and m != i for m, i in zip(mask[1:3], side, strict=True)):
        raise TfpneumoError(f"{path}: output 'mask' has shape {_shape(mask)}, expected "
                            f"{_shape((None, *side, 1))} (one probability per input pixel)")
    if len(label) != 2 or label[-1] != 1:
        raise TfpneumoError(f"{path}: output 'label' has shape {_shape(label)}, expected "
                            "(None, 1) (one probability per image)")
    probe = tuple(64 if d is None else d for d in side)
    try:
        spec = net.compute_output_spec(keras.KerasTensor((1, *probe, 1)))
        traced = {k: tuple(spec[k].shape) for k in ("mask", "label")}
    except Exception as e:  # any layer may refuse the shape, each in its own way
        raise TfpneumoError(f"{path}: the network cannot take a grey image {_shape((1, *probe, 1))} "
                            f"({first_line(e, 150)})") from e
    if traced["mask"] != (1, *probe, 1) or traced["label"] != (1, 1):
        raise TfpneumoError(f"{path}: on a grey image {_shape((1, *probe, 1))} the network gives "
                            f"mask {_shape(traced['mask'])} and label {_shape(traced['label'])}, "
                            f"expected {_shape((1, *probe, 1))} and (1, 1)")


def load_network(path: str | Path):
    """One saved tfpneumo network (safe_mode, not compiled) with ``mask`` and ``label`` outputs.

    Raises a one-line TfpneumoError naming the file if it is not a network of this tfpneumo.
    """
    import keras

    from tfpneumo.models.layers import INPUT_CONVENTION  # also registers the custom layers

    path = Path(path)
    convention = input_convention(path)
    if convention is None:
        raise TfpneumoError(f"{path}: saved by tfpneumo < 0.3, whose networks take "
                            f"ImageNet-normalised RGB; this version's take grey pixels "
                            f"0..255 ({INPUT_CONVENTION}): retrain, or predict with tfpneumo 0.2")
    if convention != INPUT_CONVENTION:
        raise TfpneumoError(f"{path}: input convention {convention!r}, this tfpneumo takes "
                            f"{INPUT_CONVENTION!r}")
    try:
        net = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # keras raises many types for a bad zip, config or weights file
        raise TfpneumoError(f"{path}: cannot load model ({first_line(e, 200)})") from e
    outputs = net.output if isinstance(net.output, dict) else {}
    if not {"mask", "label"} <= set(outputs):
        raise TfpneumoError(f"{path}: not a tfpneumo UNet (outputs must include 'mask' and "
                            "'label')")
    check_shapes(path, net)
    return net
