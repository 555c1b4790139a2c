"""Loading a saved network: ``.keras`` files of this tfpneumo, or a one-line refusal.

A ``.keras`` file is a zip whose ``config.json`` holds the model graph. Networks of this
version carry their input convention in a :class:`~tfpneumo.models.layers.GreyPixels` layer;
files of tfpneumo < 0.3 took ImageNet-normalised RGB (their first layer is a Rescaling named
``imagenet_to_pixels``) and would silently predict garbage on pixels, so they are refused
before Keras builds anything.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from tfpneumo.errors import TfpneumoError, first_line


def input_convention(path: Path) -> str | None:
    """The input convention recorded in the ``.keras`` file ``path``; None if it has none.

    Raises TfpneumoError if ``path`` is not a readable ``.keras`` zip with a config.json.
    """
    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise TfpneumoError(f"{path}: cannot load model ({first_line(e, 200)})") from e
    for layer in (config.get("config") or {}).get("layers") or []:
        if layer.get("class_name") == "GreyPixels":
            return (layer.get("config") or {}).get("convention")
    return None


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
    return net
