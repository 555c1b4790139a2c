"""``tfpneumo export``: the fold ensemble as one self-contained TensorFlow SavedModel (or
ONNX file, ``model.onnx``: the same graph converted by tf2onnx, input ``(B, H, W)`` only).

Inside the graph: the networks ``predict`` and ``submit`` use (same folds, same weights kind),
the resize of the DICOM pixels to the prediction size, horizontal-flip (and multi-scale) TTA,
the resize of the probabilities back to the input size and the decision rule of
:func:`tfpneumo.evaluation.rules.resolve_rule`. ``serving_default`` (TensorFlow Serving loads
the folder as it is):

input ``images``
    uint8 grey pixels, ``(B, H, W)`` or ``(B, H, W, 1)``, any ``H`` and ``W`` (one size per
    batch): the decoded DICOM pixels ``predict`` reads (:func:`tfpneumo.data.dicom.read_dicom`).
outputs
    ``probability`` (B, H, W) float32 mask probability at the input size, ``mask`` (B, H, W)
    uint8 0/1 under the rule, ``label_probability`` (B,) float32 (classification head) and
    ``positive`` (B,) bool, whether the rule gives the image a mask.

The resize to the prediction size is :func:`tfpneumo.data.preprocess.resize_image`'s: area
averaging when shrinking, bilinear when growing, rounded to whole grey levels as OpenCV does
on uint8 images. ``export.json`` next to the model records the source run, folds, weights
kind, rule and input convention.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tfpneumo import __version__, runs
from tfpneumo.config import Config
from tfpneumo.data.manifest import find_cache_info
from tfpneumo.errors import TfpneumoError
from tfpneumo.evaluation.rules import Rule, resolve_rule
from tfpneumo.inference.ensemble import check_options
from tfpneumo.models.layers import INPUT_CONVENTION

FORMATS = ("saved_model", "onnx")
ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
EXPORT_JSON = "export.json"
SIGNATURE = "serving_default"
OUTPUTS = ("probability", "mask", "label_probability", "positive")


def _import_tf2onnx():
    try:
        import tf2onnx
    except ImportError as e:
        raise TfpneumoError(f"--format onnx needs tf2onnx ({e}); pip install 'tfpneumo[export]'"
                            ) from None
    return tf2onnx


def _area_weights(n_in, n_out: int):
    """(n_out, n_in) float32: the share of each input pixel in each output pixel when ``n_in``
    pixels are averaged down to ``n_out`` (OpenCV's INTER_AREA, TensorFlow's ResizeArea).
    A matrix product instead of ResizeArea, which ONNX converters turn into nearest."""
    import tensorflow as tf

    scale = tf.cast(n_in, tf.float32) / float(n_out)
    out = tf.range(n_out, dtype=tf.float32)[:, None]
    pixel = tf.range(tf.cast(n_in, tf.float32), dtype=tf.float32)[None, :]
    overlap = tf.minimum(pixel + 1.0, (out + 1.0) * scale) - tf.maximum(pixel, out * scale)
    return tf.maximum(overlap, 0.0) / scale


def network_pixels(grey, height, width, size: int):
    """(B, H, W, 1) float32 grey pixels -> (B, size, size, 1) float32 whole grey levels, as
    :func:`tfpneumo.data.preprocess.resize_image` gives them on uint8 images: OpenCV's
    INTER_AREA when shrinking (``size < min(H, W)``), else INTER_LINEAR, rounded half to even,
    except the exact halving, which OpenCV rounds half up ((a + b + c + d + 2) >> 2)."""
    import tensorflow as tf

    same = tf.logical_and(tf.equal(height, size), tf.equal(width, size))
    shrink = tf.less(size, tf.minimum(height, width))
    resized = tf.case([(same, lambda: grey),
                       (shrink, lambda: tf.einsum("ih,bhwc,jw->bijc",
                                                  _area_weights(height, size), grey,
                                                  _area_weights(width, size)))],
                      default=lambda: tf.image.resize(grey, [size, size], method="bilinear"))
    halving = tf.logical_and(tf.equal(height, 2 * size), tf.equal(width, 2 * size))
    rounded = tf.where(halving, tf.floor(resized + 0.5), tf.round(resized))
    return tf.clip_by_value(rounded, 0.0, 255.0)


def _ensemble_graph(nets: list, size: int, rule: Rule, hflip: bool, scales: tuple[float, ...]):
    """The serving function: uint8 images (B, H, W[, 1]) -> the dict of :data:`OUTPUTS`."""
    import tensorflow as tf

    from tfpneumo.inference.ensemble import predict_tta

    # Python numbers, made constants inside the graph (captured eager tensors would become
    # extra inputs of a converted ONNX graph)
    bottom = float(rule.bottom)
    cut = float(rule.top if rule.kind == "triplet" else rule.bottom)
    min_area = int(rule.min_area)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name="images")])
    def serve(images):
        shape = tf.shape(images)
        rank_ok = tf.logical_or(tf.equal(tf.rank(images), 3),
                                tf.logical_and(tf.equal(tf.rank(images), 4),
                                               tf.equal(shape[-1], 1)))
        check = tf.debugging.Assert(rank_ok, ["images must be uint8 (B, H, W) or (B, H, W, 1), "
                                              "got shape", shape])
        with tf.control_dependencies([check]):
            height, width = tf.identity(shape[1]), tf.identity(shape[2])
            grey = tf.cast(tf.reshape(images, tf.stack([shape[0], height, width, 1])), tf.float32)
        pixels = network_pixels(grey, height, width, size)
        pixels = tf.ensure_shape(pixels, [None, size, size, 1])
        masks, labels = [], []
        for net in nets:
            mask, label = predict_tta(net, pixels, hflip, scales)
            masks.append(mask)
            labels.append(label)
        prob = tf.add_n(masks) / len(nets)  # (B, size, size, 1)
        label_prob = tf.add_n(labels) / len(nets)  # (B,)
        # Rule.gate on the map at the prediction size (where min_area holds)
        area = tf.reduce_sum(tf.cast(prob >= tf.constant(cut, tf.float32), tf.int32), axis=[1, 2, 3])
        positive = area >= tf.constant(min_area, tf.int32)
        if rule.kind == "label":
            positive = tf.logical_and(positive, label_prob > tf.constant(rule.label_threshold,
                                                                         tf.float32))
        # back to the input size (bilinear, as rules.resize_prob); the mask is cut there
        same = tf.logical_and(tf.equal(height, size), tf.equal(width, size))
        full = tf.cond(same, lambda: prob,
                       lambda: tf.image.resize(prob, [height, width], method="bilinear"))[..., 0]
        mask = tf.logical_and(full >= tf.constant(bottom, tf.float32), positive[:, None, None])
        return {"probability": full, "mask": tf.cast(mask, tf.uint8),
                "label_probability": label_prob, "positive": positive}

    return serve


def export(cfg: Config, *, out: Path, fmt: str = "saved_model", folds: runs.FoldSpec = "all",
           weights: str = "auto", rule: dict[str, Any] | None = None, size: int | None = None,
           hflip: bool = True, scales: Sequence[float] = (1.0,),
           workdir: Path = Path(".")) -> str:
    """Writes the SavedModel (``fmt`` saved_model) or ``model.onnx`` (onnx, needs tf2onnx)
    into ``out`` (a new or empty folder) with ``export.json`` next to the model files, and
    returns a summary. ``size`` None: the training size (``data.image_size``). Other options
    as in :func:`tfpneumo.inference.pictures.predict`. Bad options raise one line before any
    network is loaded."""
    start = time.perf_counter()
    if fmt not in FORMATS:
        raise TfpneumoError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _import_tf2onnx()
    size = int(size if size is not None else cfg.data.image_size)
    check_options(size, None, scales)
    scales = tuple(float(s) for s in scales)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TfpneumoError(f"--out {out}: exists and is not an empty folder; choose a new one")
    cache = find_cache_info(cfg.data.cache)
    clahe = cache.clahe if cache is not None else cfg.prepare.clahe
    if clahe:
        raise TfpneumoError("the run's images are CLAHE-equalised, which the exported graph "
                            "cannot do; export supports runs on caches without --clahe")
    files = runs.ensemble_files(cfg.experiment, folds, weights, workdir)
    decision, source = resolve_rule(cfg.experiment, workdir, rule, size * size, weights)

    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    from tfpneumo.models.saved import load_network

    if fmt == "onnx":
        tf2onnx = _import_tf2onnx()
    nets = [load_network(p) for p in files]
    serve = _ensemble_graph(nets, size, decision, hflip, scales)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if fmt == "saved_model":
            module = tf.Module()
            module.networks = nets  # tracked: their variables are saved with the graph
            module.serve = serve
            tf.saved_model.save(module, str(out), signatures={SIGNATURE: module.serve})
        else:
            # ONNX inputs have a fixed rank: (B, H, W) only
            @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint8,
                                                        name="images")])
            def serve_onnx(images):
                return serve(images)

            tf2onnx.convert.from_function(serve_onnx, input_signature=serve_onnx.input_signature,
                                          opset=ONNX_OPSET, output_path=str(out / ONNX_FILE))
    except OSError as e:
        raise TfpneumoError(f"{out}: cannot write ({e.strerror or e})") from e
    info = {
        "format": fmt,
        "tfpneumo": __version__,
        "run": str(runs.run_root(cfg.experiment, workdir).resolve()),
        "experiment": cfg.experiment,
        "folds": [runs.fold_of(p) for p in files],
        "networks": [f"{p.parent.name}/{p.name}" for p in files],
        "weights": weights,
        "weights_kinds": sorted({p.stem for p in files}),  # what "auto" resolved to
        "rule": decision.to_json(),
        "rule_source": source,
        "size": size,
        "tta": {"hflip": hflip, "scales": list(scales)},
        **({"signature": SIGNATURE} if fmt == "saved_model" else
           {"file": ONNX_FILE, "opset": ONNX_OPSET}),
        "input": {"name": "images", "dtype": "uint8",
                  "shape": "(B, H, W) or (B, H, W, 1)" if fmt == "saved_model" else "(B, H, W)",
                  "pixels": "decoded DICOM grey pixels 0..255, any H and W (one size per batch)",
                  "resize": f"to {size}x{size} inside: area when shrinking, bilinear when "
                            "growing, rounded to whole grey levels; non-square images squashed",
                  "network_convention": INPUT_CONVENTION},
        "outputs": {"probability": "(B, H, W) float32 mask probability at the input size",
                    "mask": "(B, H, W) uint8 0/1 under the rule",
                    "label_probability": "(B,) float32 image-level probability",
                    "positive": "(B,) bool: the rule gives the image a mask"},
    }
    (out / EXPORT_JSON).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    tta = "hflip" if hflip else "no flip"
    if scales != (1.0,):
        tta += f", scales {','.join(f'{s:g}' for s in scales)}"
    return (f"exported {len(files)} fold(s) ({', '.join(info['networks'])}) as {fmt} to {out}; "
            f"{tta}, size {size}; thresholds {decision.describe()} ({source}); "
            f"{'signature ' + SIGNATURE if fmt == 'saved_model' else ONNX_FILE}; "
            f"{time.perf_counter() - start:.1f} s")
