"""``tfpneumo export``: the fold ensemble as one self-contained TensorFlow SavedModel, ONNX file
(``model.onnx``: the same graph converted by tf2onnx, input ``(B, H, W)`` only) or LiteRT file
(``model.tflite``: converted by TensorFlow's TFLiteConverter, builtin ops only, input fixed to
``(1, H, W)``, ``--input-size``, 1024 x 1024 by default).

Inside the graph: the networks ``predict`` and ``submit`` use (same folds, same weights kind),
the resize of the DICOM pixels to the prediction size, horizontal-flip (and multi-scale) TTA,
the resize of the probabilities back to the input size and the decision rule of
:func:`tfpneumo.evaluation.rules.resolve_rule`. Signatures (TensorFlow Serving loads the
SavedModel folder as it is; the .tflite file holds the same two):

``serving_default``, input ``images``
    uint8 grey pixels, ``(B, H, W)`` or ``(B, H, W, 1)``, any ``H`` and ``W`` (one size per
    batch): the decoded DICOM pixels ``predict`` reads (:func:`tfpneumo.data.dicom.read_dicom`).
``serving_uint16``, input ``images``
    uint16 grey pixels (a 16-bit DICOM's ``pixel_array``, MONOCHROME2), same shapes, windowed
    to 0..255 inside as :func:`tfpneumo.data.dicom.to_uint8` does: each image to its own
    min..max, ``rint((p - min) * (255 / (max - min)))``, a constant image 0.
outputs (both)
    ``probability`` (B, H, W) float32 mask probability at the input size, ``mask`` (B, H, W)
    uint8 0/1 under the rule, ``label_probability`` (B,) float32 (classification head) and
    ``positive`` (B,) bool, whether the rule gives the image a mask.

The resize to the prediction size is :func:`tfpneumo.data.preprocess.resize_image`'s: area
averaging when shrinking, bilinear when growing, rounded to whole grey levels as OpenCV does
on uint8 images. ``export.json`` next to the model records the source run, folds, weights
kind, rule and, per signature, the input dtype and shape convention.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tfpneumo import __version__, runs
from tfpneumo.config import Config
from tfpneumo.data.manifest import find_cache_info
from tfpneumo.errors import TfpneumoError, first_line
from tfpneumo.evaluation.rules import Rule, resolve_rule
from tfpneumo.inference.ensemble import check_options
from tfpneumo.models.layers import INPUT_CONVENTION

FORMATS = ("saved_model", "onnx", "litert")
ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
LITERT_FILE = "model.tflite"
LITERT_INPUT_SIZE = (1024, 1024)  # the SIIM DICOMs' size: LiteRT runs a fixed shape
MAX_INPUT_SIDE = 16384
QUANTIZE = ("none", "float16", "dynamic")
EXPORT_JSON = "export.json"
SIGNATURE = "serving_default"
SIGNATURE_UINT16 = "serving_uint16"
OUTPUTS = ("probability", "mask", "label_probability", "positive")
LITERT_HINT = "pip install 'tfpneumo[export]'"


def _import_tf2onnx():
    try:
        import tf2onnx
    except ImportError as e:
        raise TfpneumoError(f"--format onnx needs tf2onnx ({e}); pip install 'tfpneumo[export]'"
                            ) from None
    return tf2onnx


def _import_litert_interpreter():
    """The LiteRT runtime, which export uses to check that the written file loads."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        raise TfpneumoError(f"--format litert needs the LiteRT runtime ai-edge-litert ({e}); "
                            f"{LITERT_HINT}") from None
    return Interpreter


def check_export_options(fmt: str, input_size: Sequence[int] | None, quantize: str,
                         scales: Sequence[float] = (1.0,)) -> tuple[int, int] | None:
    """One-line errors for the format options; returns the fixed input size (H, W) of LiteRT
    (``LITERT_INPUT_SIZE`` when ``input_size`` is None), None for the other formats."""
    if fmt not in FORMATS:
        raise TfpneumoError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise TfpneumoError(f"--quantize {quantize}: expected one of {', '.join(QUANTIZE)}")
    if fmt != "litert":
        if input_size is not None:
            raise TfpneumoError(f"--input-size: only for --format litert ({fmt} takes any H and W)")
        if quantize != "none":
            raise TfpneumoError(f"--quantize {quantize}: only for --format litert")
        return None
    shrinking = [s for s in scales if float(s) < 1.0]
    if shrinking:
        # predict_tta shrinks with an antialiased resize (ScaleAndTranslate): no LiteRT
        # builtin, and the pip runtime has no TensorFlow ops (SELECT_TF_OPS)
        raise TfpneumoError(f"--scales {','.join(f'{float(s):g}' for s in scales)}: --format "
                            "litert cannot shrink for TTA (no builtin antialiased resize); use "
                            "scales >= 1 or --format saved_model")
    if input_size is None:
        return LITERT_INPUT_SIZE
    sides = tuple(input_size)
    if len(sides) != 2 or not all(isinstance(s, int) and 1 <= s <= MAX_INPUT_SIDE for s in sides):
        raise TfpneumoError(f"--input-size {' '.join(map(str, sides))}: expected two sides H W, "
                            f"whole numbers from 1 to {MAX_INPUT_SIDE}")
    return sides[0], sides[1]


def _area_weights(n_in, n_out: int):
    """(n_out, n_in) float32: the share of each input pixel in each output pixel when ``n_in``
    pixels are averaged down to ``n_out`` (OpenCV's INTER_AREA, TensorFlow's ResizeArea).
    Matrix products instead of ResizeArea, which ONNX converters turn into nearest and LiteRT
    lacks."""
    import tensorflow as tf

    scale = tf.cast(n_in, tf.float32) / float(n_out)
    out = tf.range(n_out, dtype=tf.float32)[:, None]
    pixel = tf.range(tf.cast(n_in, tf.float32), dtype=tf.float32)[None, :]
    overlap = tf.minimum(pixel + 1.0, (out + 1.0) * scale) - tf.maximum(pixel, out * scale)
    return tf.maximum(overlap, 0.0) / scale


def _area_shrink(grey, height, width, size: int):
    """(B, H, W, 1) -> (B, size, size, 1): rows, then columns, averaged by matrix products."""
    import tensorflow as tf

    # squeeze/expand_dims, not [..., 0]: tf2onnx cannot slice with an ellipsis where it
    # lost the rank (inside tf.case)
    rows = tf.matmul(_area_weights(height, size)[None], tf.squeeze(grey, [3]))  # (B, size, W)
    both = tf.matmul(rows, _area_weights(width, size), transpose_b=True)  # (B, size, size)
    return tf.expand_dims(both, 3)


def network_pixels(grey, height, width, size: int):
    """(B, H, W, 1) float32 grey pixels -> (B, size, size, 1) float32 whole grey levels, as
    :func:`tfpneumo.data.preprocess.resize_image` gives them on uint8 images: OpenCV's
    INTER_AREA when shrinking (``size < min(H, W)``), else INTER_LINEAR, rounded half to even,
    except the exact halving, which OpenCV rounds half up ((a + b + c + d + 2) >> 2).

    ``height`` and ``width`` are tensors (any size, the branch chosen in the graph) or Python
    ints (a fixed size: the branch chosen here, no control flow in the graph)."""
    import tensorflow as tf

    if isinstance(height, int) and isinstance(width, int):
        if height == size and width == size:
            resized = grey
        elif size < min(height, width):
            resized = _area_shrink(grey, height, width, size)
        else:
            resized = tf.image.resize(grey, [size, size], method="bilinear")
        halving = height == 2 * size and width == 2 * size
        rounded = tf.floor(resized + 0.5) if halving else tf.round(resized)
        return tf.clip_by_value(rounded, 0.0, 255.0)
    same = tf.logical_and(tf.equal(height, size), tf.equal(width, size))
    shrink = tf.less(size, tf.minimum(height, width))
    resized = tf.case([(same, lambda: grey),
                       (shrink, lambda: _area_shrink(grey, height, width, size))],
                      default=lambda: tf.image.resize(grey, [size, size], method="bilinear"))
    halving = tf.logical_and(tf.equal(height, 2 * size), tf.equal(width, 2 * size))
    rounded = tf.where(halving, tf.floor(resized + 0.5), tf.round(resized))
    return tf.clip_by_value(rounded, 0.0, 255.0)


def window_uint16(pixels):
    """(B, H, W, 1) uint16 -> float32 whole grey levels 0..255, exactly
    :func:`tfpneumo.data.dicom.to_uint8`: each image windowed to its own min..max in float64,
    ``rint((p - min) * (255 / (max - min)))`` (half to even), a constant image 0."""
    import tensorflow as tf

    values = tf.cast(pixels, tf.float64)
    low = tf.reduce_min(values, axis=[1, 2, 3], keepdims=True)
    high = tf.reduce_max(values, axis=[1, 2, 3], keepdims=True)
    scale = tf.math.divide_no_nan(tf.constant(255.0, tf.float64), high - low)  # 0 when constant
    grey = tf.clip_by_value(tf.round((values - low) * scale), 0.0, 255.0)
    return tf.cast(grey, tf.float32)


def _float64_half_levels(span, k):
    """Where ``255 (p - min) / span`` is exactly ``k + 1/2``: the level to_uint8's float64
    arithmetic gives, ``k`` or ``k + 1``, or -1 where it computes ``k + 1/2`` exactly (rint then
    rounds to even). ``span`` (B, 1, 1, 1) int32 > 0, ``k`` (B, H, W, 1) int32.

    float64 stores ``255 / span`` as ``M * 2^-shift`` (M of 53 bits, rounded to nearest), and
    ``(p - min) * M * 2^-shift`` is ``(k + 1/2)(1 + error)``, which rounds away from the half
    level when ``(k + 1/2) * |error|`` exceeds half its unit in the last place. All of it is
    found in int32 from ``255 * 2^shift mod span``; checked against numpy for every half level
    of every range 1..65535 (190,695 of them; float64 rounds 13,379 off even)."""
    import tensorflow as tf

    r = tf.maximum(span, 1)
    # binade of 255 / r: 2^binade <= 255 / r < 2^(binade + 1), binade in -9..7
    binade = tf.add_n([tf.cast(r * 2 ** j <= 255 if j >= 0 else r <= 255 * 2 ** -j, tf.int32)
                       for j in range(-9, 8)]) - 10
    shift = 52 - binade  # 45..61
    # 2^shift mod r and mod 2r by doubling (every intermediate < 2^18)
    power_r, power_2r = tf.ones_like(r), tf.ones_like(r)
    at_shift_r, at_shift_2r = power_r, power_2r
    for j in range(1, 62):
        power_r = tf.math.floormod(2 * power_r, r)
        power_2r = tf.math.floormod(2 * power_2r, 2 * r)
        at_shift_r = tf.where(tf.equal(shift, j), power_r, at_shift_r)
        at_shift_2r = tf.where(tf.equal(shift, j), power_2r, at_shift_2r)
    remainder = tf.math.floormod(255 * at_shift_r, r)  # of 255 * 2^shift / r
    quotient_odd = tf.equal(tf.math.floormod(255 * at_shift_2r, 2 * r) - remainder, r)
    rounded_up = tf.logical_or(2 * remainder > r,
                               tf.logical_and(tf.equal(2 * remainder, r), quotient_odd))
    error = tf.where(rounded_up, r - remainder, remainder)  # |M r - 255 2^shift|
    odd = 2 * k + 1  # (k + 1/2) = odd / 2, in binade e
    e = tf.add_n([tf.cast(odd >= 2 ** j, tf.int32) for j in range(1, 10)]) - 1
    # moved off k + 1/2 when odd * error > 255 * 2^(e - binade) (both < 2^24: exact in
    # float32); below 1/2, a power of two, the unit in the last place is half as large
    lhs = tf.cast(odd * error, tf.float32) * tf.where(
        tf.logical_and(tf.equal(k, 0), tf.logical_not(rounded_up)), 2.0, 1.0)
    powers = tf.constant([2.0 ** i for i in range(17)], tf.float32)
    rhs = 255.0 * tf.gather(powers, tf.clip_by_value(e - binade, 0, 16))
    moved = tf.logical_and(lhs > rhs, error > 0)
    return tf.where(moved, tf.where(rounded_up, k + 1, k), -1)


def window_uint16_integer(pixels):
    """(B, H, W, 1) uint16 (or int32 holding 0..65535) -> float32 grey levels 0..255 equal to
    :func:`window_uint16`'s, in int32 arithmetic for LiteRT (whose builtin ops have no
    float64): the exact rational ``255 (p - min) / (max - min)`` rounded to the nearest level
    (exact in int32 wherever it is not a half level: float64's error is far smaller than the
    distance to one), and at exact half levels the level float64 gives
    (:func:`_float64_half_levels`), which is not always the even one."""
    import tensorflow as tf

    values = tf.cast(pixels, tf.int32)
    low = tf.reduce_min(values, axis=[1, 2, 3], keepdims=True)
    span = tf.reduce_max(values, axis=[1, 2, 3], keepdims=True) - low
    twice = 510 * (values - low) + span  # at most 510 * 65535 + 65535 < 2 ** 25
    denominator = tf.maximum(2 * span, 1)
    level = tf.math.floordiv(twice, denominator)  # round half up
    half = tf.logical_and(tf.equal(tf.math.floormod(twice, denominator), 0), span > 0)
    below = level - 1  # at a half level: level - 1/2 exactly
    float64 = _float64_half_levels(span, below)
    to_even = below + tf.math.floormod(below, 2)
    level = tf.where(half, tf.where(float64 >= 0, float64, to_even), level)
    return tf.cast(tf.where(span > 0, level, 0), tf.float32)


def _ensemble_outputs(nets: list, size: int, rule: Rule, hflip: bool, scales: tuple[float, ...]):
    """``outputs(grey (B, H, W, 1) float32 whole grey levels, height, width)`` -> the dict of
    :data:`OUTPUTS` (height and width: tensors, or Python ints for a fixed size)."""
    import tensorflow as tf

    from tfpneumo.inference.ensemble import ensemble_tta

    # Python numbers, made constants inside the graph (captured eager tensors would become
    # extra inputs of a converted ONNX graph)
    bottom = float(rule.bottom)
    cut = float(rule.top if rule.kind == "triplet" else rule.bottom)
    min_area = int(rule.min_area)

    def outputs(grey, height, width):
        pixels = network_pixels(grey, height, width, size)
        pixels = tf.ensure_shape(pixels, [None, size, size, 1])
        # (B, size, size, 1), (B,)
        prob, label_prob = ensemble_tta(nets, pixels, hflip, scales, rule.merge)
        # Rule.gate on the map at the prediction size (where min_area holds)
        area = tf.reduce_sum(tf.cast(prob >= tf.constant(cut, tf.float32), tf.int32), axis=[1, 2, 3])
        positive = area >= tf.constant(min_area, tf.int32)
        if rule.kind == "label":
            positive = tf.logical_and(positive, label_prob > tf.constant(rule.label_threshold,
                                                                         tf.float32))
        # back to the input size (bilinear, as rules.resize_prob); the mask is cut there
        if isinstance(height, int) and isinstance(width, int):
            full = prob if (height, width) == (size, size) else tf.image.resize(
                prob, [height, width], method="bilinear")
        else:
            same = tf.logical_and(tf.equal(height, size), tf.equal(width, size))
            full = tf.cond(same, lambda: prob,
                           lambda: tf.image.resize(prob, [height, width], method="bilinear"))
        full = full[..., 0]
        mask = tf.logical_and(full >= tf.constant(bottom, tf.float32), positive[:, None, None])
        return {"probability": full, "mask": tf.cast(mask, tf.uint8),
                "label_probability": label_prob, "positive": positive}

    return outputs


def _serving_functions(nets: list, size: int, rule: Rule, hflip: bool,
                       scales: tuple[float, ...], input_size: tuple[int, int] | None = None):
    """{signature name: tf.function}: uint8 (``serving_default``) and uint16 images in, the
    dict of :data:`OUTPUTS` out; the uint16 one windows, then calls the uint8 one.
    ``input_size`` None: any (B, H, W[, 1]); (H, W): exactly (1, H, W), traced without
    control flow or float64 and with the weights as constants (what LiteRT runs)."""
    import tensorflow as tf

    outputs = _ensemble_outputs(nets, size, rule, hflip, scales)
    if input_size is not None:
        height, width = input_size

        from tfpneumo.compat import with_constants

        # the converter names a .tflite signature after its function; the weights become
        # constants (with two signatures the converter would leave them unset: compat)
        @with_constants
        @tf.function(input_signature=[tf.TensorSpec([1, height, width], tf.uint8, name="images")])
        def serving_default(images):
            return outputs(tf.cast(images, tf.float32)[..., None], height, width)

        @tf.function(input_signature=[tf.TensorSpec([1, height, width], tf.uint16, name="images")])
        def serving_uint16(images):
            # cast before slicing: LiteRT's StridedSlice takes no uint16
            grey = window_uint16_integer(tf.cast(images, tf.int32)[..., None])
            # whole levels 0..255: the uint8 graph, traced once for both
            return serving_default(tf.cast(grey[..., 0], tf.uint8))

        return {SIGNATURE: serving_default, SIGNATURE_UINT16: serving_uint16}

    def as_batch(images, dtype: str):
        shape = tf.shape(images)
        rank_ok = tf.logical_or(tf.equal(tf.rank(images), 3),
                                tf.logical_and(tf.equal(tf.rank(images), 4),
                                               tf.equal(shape[-1], 1)))
        check = tf.debugging.Assert(rank_ok, [f"images must be {dtype} (B, H, W) or (B, H, W, 1), "
                                              "got shape", shape])
        with tf.control_dependencies([check]):
            height, width = tf.identity(shape[1]), tf.identity(shape[2])
            return tf.reshape(images, tf.stack([shape[0], height, width, 1])), height, width

    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name="images")])
    def serve(images):
        grey, height, width = as_batch(images, "uint8")
        return outputs(tf.cast(grey, tf.float32), height, width)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint16, name="images")])
    def serve_uint16(images):
        grey, _, _ = as_batch(images, "uint16")
        return serve(tf.cast(window_uint16(grey), tf.uint8))  # whole levels 0..255

    return {SIGNATURE: serve, SIGNATURE_UINT16: serve_uint16}


def synthetic_image(height: int, width: int, dtype) -> Any:
    """(1, H, W) diagonal stripes over the whole range of ``dtype`` (uint8 or uint16): an
    input that reaches every grey level, for the check after conversion."""
    import numpy as np

    top = 255 if np.dtype(dtype) == np.uint8 else 4095  # 12 bits, as CR/DR detectors store
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    return ((rows * 3 + cols * 5) % (top + 1)).astype(dtype)[None]


def _write_litert(tf, serving: dict, path: Path, quantize: str) -> float:
    """Converts the fixed-shape signatures to ``path`` (builtin ops only), then runs both in
    the LiteRT interpreter on :func:`synthetic_image` next to TensorFlow: an op the runtime
    lacks, or a broken conversion, fails here rather than at the user's. Returns the largest
    probability difference seen (float32: ~1e-6; quantised: what the quantisation costs)."""
    import numpy as np

    functions = [serving[name].get_concrete_function() for name in (SIGNATURE, SIGNATURE_UINT16)]
    converter = tf.lite.TFLiteConverter.from_concrete_functions(functions, tf.Module())
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # alone: int8 weights ("dynamic")
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
    try:
        model = converter.convert()
    except Exception as e:  # the converter's ConverterError holds pages of MLIR diagnostics
        raise TfpneumoError(f"--format litert: TensorFlow's converter failed ({first_line(e)})"
                            ) from e
    path.write_bytes(model)
    interpreter = _import_litert_interpreter()(model_path=str(path))
    found = sorted(interpreter.get_signature_list())
    if found != [SIGNATURE, SIGNATURE_UINT16]:
        raise TfpneumoError(f"--format litert: the converted file has signatures {found}, "
                            f"expected {SIGNATURE}, {SIGNATURE_UINT16}")
    largest = 0.0
    for name, dtype in ((SIGNATURE, np.uint8), (SIGNATURE_UINT16, np.uint16)):
        shape = serving[name].input_signature[0].shape
        image = synthetic_image(shape[1], shape[2], dtype)
        lite = interpreter.get_signature_runner(name)(images=image)["probability"]
        expected = serving[name](tf.constant(image))["probability"].numpy()
        difference = float(np.max(np.abs(lite - expected)))
        # NaN or far off: a conversion that lost something (quantised files differ by more)
        if not np.isfinite(difference) or difference > (1e-3 if quantize == "none" else 0.5):
            raise TfpneumoError(f"--format litert: {name} of the converted file differs from "
                                f"TensorFlow by {difference:.3g} on a test image; not written")
        largest = max(largest, difference)
    return largest


@contextlib.contextmanager
def _new_folder(out: Path):
    """Yields a temporary folder beside ``out``, renamed onto ``out`` (absent or empty) when
    the block ends; on an exception it is removed and ``out`` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the folder gets the umask's permissions (mkdtemp's 0700 would
    # keep a model server running as another user out)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty (checked before); rename() needs it gone or empty
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _input_description(fmt: str, size: int, input_size: tuple[int, int] | None) -> dict:
    """export.json's ``inputs``: per signature its dtype, shape and pixel convention."""
    if fmt == "litert":
        height, width = input_size
        shape = f"(1, {height}, {width})"
        sides = f"exactly {height}x{width}, batch 1"
    else:
        shape = "(B, H, W) or (B, H, W, 1)" if fmt == "saved_model" else "(B, H, W)"
        sides = "any H and W (one size per batch)"
    window = ("windowed to 0..255 inside, each image to its own min..max: "
              "rint((p - min) * 255 / (max - min)), a constant image 0 (read_dicom's to_uint8)")
    if fmt == "litert":
        window += "; computed in int32 with float64's rounding at exact half levels"
    uint8 = {"name": "images", "dtype": "uint8", "shape": shape,
             "pixels": f"decoded DICOM grey pixels 0..255 (read_dicom), {sides}"}
    uint16 = {"name": "images", "dtype": "uint16", "shape": shape,
              "pixels": f"a 16-bit MONOCHROME2 DICOM's pixel_array, {sides}; {window}"}
    common = {"resize": f"to {size}x{size} inside: area when shrinking, bilinear when growing, "
                        "rounded to whole grey levels; non-square images squashed",
              "network_convention": INPUT_CONVENTION}
    if fmt == "onnx":  # one graph, one input dtype
        return {SIGNATURE: {**uint8, **common}}
    return {SIGNATURE: {**uint8, **common}, SIGNATURE_UINT16: {**uint16, **common}}


def export(cfg: Config, *, out: Path, fmt: str = "saved_model", folds: runs.FoldSpec = "all",
           weights: str = "auto", rule: dict[str, Any] | None = None, size: int | None = None,
           hflip: bool = True, scales: Sequence[float] = (1.0,),
           input_size: Sequence[int] | None = None, quantize: str = "none",
           workdir: Path = Path(".")) -> str:
    """Writes the SavedModel (``fmt`` saved_model), ``model.onnx`` (onnx, needs tf2onnx) or
    ``model.tflite`` (litert, needs ai-edge-litert to check it) into ``out`` (a new or empty
    folder, written whole or not at all) with ``export.json`` next to the model files, and
    returns a summary. ``size`` None: the training size (``data.image_size``). ``input_size``
    (H, W) and ``quantize`` (none, float16, dynamic) only for litert. Other options as in
    :func:`tfpneumo.inference.pictures.predict`. Bad options raise one line before any network
    is loaded."""
    start = time.perf_counter()
    input_size = check_export_options(fmt, input_size, quantize, scales)
    if fmt == "onnx":
        _import_tf2onnx()
    if fmt == "litert":
        _import_litert_interpreter()
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

    nets = [load_network(p) for p in files]
    serving = _serving_functions(nets, size, decision, hflip, scales, input_size)
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
        "tta": {"hflip": hflip, "scales": list(scales), "merge": decision.merge},
    }
    try:
        with _new_folder(out) as tmp:
            if fmt == "saved_model":
                module = tf.Module()
                module.networks = nets  # tracked: their variables are saved with the graph
                module.serve, module.serve_uint16 = serving[SIGNATURE], serving[SIGNATURE_UINT16]
                tf.saved_model.save(module, str(tmp), signatures={
                    SIGNATURE: module.serve, SIGNATURE_UINT16: module.serve_uint16})
                info["signatures"] = [SIGNATURE, SIGNATURE_UINT16]
                written = f"signatures {SIGNATURE}, {SIGNATURE_UINT16}"
            elif fmt == "onnx":
                tf2onnx = _import_tf2onnx()
                serve = serving[SIGNATURE]

                # ONNX inputs have a fixed rank: (B, H, W) only
                @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint8,
                                                            name="images")])
                def serve_onnx(images):
                    return serve(images)

                tf2onnx.convert.from_function(serve_onnx,
                                              input_signature=serve_onnx.input_signature,
                                              opset=ONNX_OPSET, output_path=str(tmp / ONNX_FILE))
                info.update(file=ONNX_FILE, opset=ONNX_OPSET)
                written = ONNX_FILE
            else:
                difference = _write_litert(tf, serving, tmp / LITERT_FILE, quantize)
                info.update(file=LITERT_FILE, signatures=[SIGNATURE, SIGNATURE_UINT16],
                            quantize=quantize, input_size=list(input_size), batch=1,
                            ops="TFLite builtins only (no SELECT_TF_OPS)",
                            check={"image": "synthetic stripes, both signatures",
                                   "max_probability_difference_vs_tensorflow": difference})
                mib = (tmp / LITERT_FILE).stat().st_size / 2 ** 20
                written = (f"{LITERT_FILE} ({mib:.1f} MiB, input (1, {input_size[0]}, "
                           f"{input_size[1]}), quantize {quantize}; max difference to "
                           f"TensorFlow on a test image {difference:.1e})")
            info["inputs"] = _input_description(fmt, size, input_size)
            info["outputs"] = {
                "probability": "(B, H, W) float32 mask probability at the input size",
                "mask": "(B, H, W) uint8 0/1 under the rule",
                "label_probability": "(B,) float32 image-level probability",
                "positive": "(B,) bool: the rule gives the image a mask"}
            (tmp / EXPORT_JSON).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise TfpneumoError(f"{out}: cannot write ({e.strerror or e})") from e
    tta = "hflip" if hflip else "no flip"
    if scales != (1.0,):
        tta += f", scales {','.join(f'{s:g}' for s in scales)}"
    return (f"exported {len(files)} fold(s) ({', '.join(info['networks'])}) as {fmt} to {out}; "
            f"{tta}, size {size}; thresholds {decision.describe()} ({source}); {written}; "
            f"{time.perf_counter() - start:.1f} s")
