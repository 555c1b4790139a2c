"""tfpneumo export: the SavedModel, ONNX and LiteRT files, loaded in a fresh process, reproduce
predict on real DICOMs (8-bit, and 16-bit ones made from them)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from factories import make_run

import tfpneumo  # noqa: F401  (sets SM_FRAMEWORK before segmentation_models is imported)
from tfpneumo import TfpneumoError

SIZE = 64  # prediction size inside the graph: small keeps the test fast
TOLERANCE = 1e-4  # max |probability - predict's| allowed; measured: 1.2e-7 SavedModel,
# 1.5e-6 ONNX, 1.3e-6 LiteRT (10 siim-mini test DICOMs, sizes 64 and 128; 6.6e-6 ONNX at 512)

# The 16-bit test image: a real DICOM's grey levels times 16 plus a 0..15 texture, clipped to
# 0..4010. That range has exact half levels (510 (p - min) an odd multiple of 4010) at
# p = 401, 1203, 2005, 2807, 3609, and float64 rounds 401, 2005 and 3609 away from even there.
RANGE_16BIT = 4010
FLOAT64_OFF_EVEN = (401, 2005, 3609)


def write_16bit_dicom(source, path):
    """A 16-bit (12 bits stored) uncompressed MONOCHROME2 copy of the real DICOM ``source``
    with the pixels described at :data:`RANGE_16BIT`; returns its uint16 pixels."""
    import warnings

    import pydicom

    with warnings.catch_warnings():  # SIIM's "ID_..." UIDs are not valid UIDs; kept as they are
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(source)
        rows, cols = np.indices(ds.pixel_array.shape)
        pixels = ds.pixel_array.astype(np.uint16) * 16 + (rows * 7 + cols * 3) % 16
        pixels = np.minimum(pixels, RANGE_16BIT).astype(np.uint16)
        pixels[0, 0], pixels[0, 1] = 0, RANGE_16BIT
        ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=12)
        ds.save_as(path)
    return pixels


def predictions_of(cfg, files, workdir, hflip: bool = True, merge: str = "mean"):
    """predict's own Predictor: the oracle of every equivalence test here."""
    from tfpneumo.inference.ensemble import predictor
    from tfpneumo.inference.images import dicom_items

    return list(predictor(cfg, size=SIZE, hflip=hflip, workdir=workdir, merge=merge)
                .predict(dicom_items(files)))


@pytest.fixture(scope="module")
def real_run(siim_mini, tmp_path_factory):
    """One tiny run and predict's predictions, shared by the equivalence tests: two real test
    DICOMs (1024 x 1024, 8-bit) and a 16-bit DICOM made from the second."""
    workdir = tmp_path_factory.mktemp("export-run")
    cfg = make_run(workdir)
    files = sorted((siim_mini / "dicom-images-test").glob("*.dcm"))[:2]
    wide = write_16bit_dicom(files[1], workdir / "16bit.dcm")
    return SimpleNamespace(workdir=workdir, cfg=cfg, files=files, wide=wide,
                           dicom16=workdir / "16bit.dcm",
                           predictions=predictions_of(cfg, [*files, workdir / "16bit.dcm"],
                                                      workdir))


# Runs in a fresh Python: only TensorFlow and the exported folder, no tfpneumo network code.
SERVE = """
import sys, numpy as np, tensorflow as tf
model, images, out = sys.argv[1:4]
loaded = tf.saved_model.load(model)
pixels = np.load(images)
outputs = {}
for i in range(len(pixels.files)):
    image = pixels[f"image_{i}"]  # uint16: the 16-bit signature
    serve = loaded.signatures["serving_uint16" if image.dtype == np.uint16 else "serving_default"]
    for name, value in serve(images=tf.constant(image[None])).items():
        outputs[f"{name}_{i}"] = value.numpy()[0]
serve = loaded.signatures["serving_default"]
# (B, H, W, 1) is taken too, and a batch of two
pair = np.stack([pixels["image_0"], pixels["image_1"]])[..., None]
outputs["pair"] = serve(images=tf.constant(pair))["probability"].numpy()
try:  # three channels: refused, saying what the input must be
    serve(images=tf.zeros((1, 8, 8, 3), tf.uint8))
except tf.errors.InvalidArgumentError as e:
    outputs["refused"] = "images must be uint8 (B, H, W) or (B, H, W, 1)" in str(e)
np.savez(out, **outputs)
"""


def served_inputs(predictions, wide: dict[int, np.ndarray]):
    """The pixels each served model gets: predict's decoded uint8 pixels, or for the images in
    ``wide`` the 16-bit DICOM's own uint16 pixel_array."""
    return {f"image_{i}": wide.get(i, p.original) for i, p in enumerate(predictions)}


def test_saved_model_in_a_fresh_process_reproduces_predict(real_run, tmp_path):
    """The library functions predict uses (Predictor, resize_prob, Rule.mask) against the
    exported serving_default signature on two real test DICOMs (1024 x 1024 uint8), and
    serving_uint16 on a 16-bit DICOM made from one of them (predict reads it through
    read_dicom's windowing)."""
    from tfpneumo.evaluation.rules import resize_prob, resolve_rule
    from tfpneumo.inference.export import export

    cfg, workdir, predictions = real_run.cfg, real_run.workdir, real_run.predictions
    # the label rule with its threshold between the images' label probabilities: the
    # exported gate must say yes to some images and no to others
    labels = sorted(p.label_prob for p in predictions)
    rule = {"kind": "label", "label_threshold": round(0.5 * (labels[0] + labels[1]), 7),
            "bottom": 0.5, "min_area": 1}
    decision, _ = resolve_rule(cfg.experiment, workdir, rule, SIZE * SIZE)
    assert {decision.gate(p.prob, p.label_prob) for p in predictions} == {True, False}

    out = tmp_path / "model"
    summary = export(cfg, out=out, rule=rule, size=SIZE, workdir=workdir)
    assert summary.startswith(f"exported 1 fold(s) (fold_0/best.keras) as saved_model to {out}")
    assert "signatures serving_default, serving_uint16" in summary
    info = json.loads((out / "export.json").read_text())
    assert info["folds"] == [0] and info["networks"] == ["fold_0/best.keras"]
    assert info["weights"] == "auto" and info["weights_kinds"] == ["best"] and info["size"] == SIZE
    assert info["rule"] == {"rule": "label", "bottom": 0.5, "top": None, "min_area": 1,
                            "label_threshold": rule["label_threshold"], "merge": "mean"}
    assert info["rule_source"] == "options"
    assert info["tta"] == {"hflip": True, "scales": [1.0], "merge": "mean"}
    assert info["signatures"] == ["serving_default", "serving_uint16"]
    inputs = info["inputs"]
    assert [inputs[s]["dtype"] for s in info["signatures"]] == ["uint8", "uint16"]
    assert {inputs[s]["shape"] for s in info["signatures"]} == {"(B, H, W) or (B, H, W, 1)"}
    assert inputs["serving_default"]["network_convention"] == "grey-pixels-0-255"
    assert info["run"] == str((workdir / "runs" / "tiny").resolve())

    np.savez(tmp_path / "images.npz", **served_inputs(predictions, {2: real_run.wide}))
    subprocess.run([sys.executable, "-c", SERVE, str(out), str(tmp_path / "images.npz"),
                    str(tmp_path / "served.npz")], check=True, capture_output=True, timeout=300)
    served = np.load(tmp_path / "served.npz")
    probs = []
    for i, p in enumerate(predictions):
        prob = resize_prob(p.prob, p.original.shape)
        probs.append(prob)
        assert served[f"probability_{i}"].shape == p.original.shape == (1024, 1024)
        assert np.abs(served[f"probability_{i}"] - prob).max() <= TOLERANCE
        np.testing.assert_array_equal(
            served[f"mask_{i}"], decision.mask(p.prob, p.label_prob, p.original.shape))
        assert abs(float(served[f"label_probability_{i}"]) - p.label_prob) <= TOLERANCE
        assert bool(served[f"positive_{i}"]) == decision.gate(p.prob, p.label_prob)
    assert np.abs(served["pair"] - np.stack(probs[:2])).max() <= TOLERANCE
    assert bool(served["refused"])


def test_export_bad_inputs_are_one_line_errors(tmp_path):
    from tfpneumo.config import load_config
    from tfpneumo.inference.export import export

    rule = {"bottom": 0.5}
    cfg = load_config(None, ["experiment=none", f"data.cache={tmp_path / 'no-cache'}"])
    with pytest.raises(TfpneumoError, match=r"--format pmml: expected one of saved_model") as e:
        export(cfg, out=tmp_path / "m", fmt="pmml", rule=rule, workdir=tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(TfpneumoError, match="no trained fold") as e:
        export(cfg, out=tmp_path / "m", rule=rule, workdir=tmp_path)
    assert "\n" not in str(e.value) and not (tmp_path / "m").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(TfpneumoError, match="not an empty folder"):
        export(cfg, out=tmp_path / "full", rule=rule, workdir=tmp_path)
    clahe = load_config(None, ["experiment=none", f"data.cache={tmp_path / 'no-cache'}",
                               "prepare.clahe=true"])
    with pytest.raises(TfpneumoError, match="CLAHE-equalised, which the exported graph cannot"):
        export(clahe, out=tmp_path / "m", rule=rule, workdir=tmp_path)
    for options, message in (
            ({"fmt": "litert", "input_size": (0, 1024)},
             "--input-size 0 1024: expected two sides H W, whole numbers from 1 to 16384"),
            ({"fmt": "litert", "input_size": (1024,)},
             "--input-size 1024: expected two sides H W, whole numbers from 1 to 16384"),
            ({"fmt": "saved_model", "input_size": (512, 512)},
             "--input-size: only for --format litert (saved_model takes any H and W)"),
            ({"fmt": "litert", "quantize": "int4"},
             "--quantize int4: expected one of none, float16, dynamic"),
            ({"fmt": "onnx", "quantize": "float16"}, "--quantize float16: only for --format litert"),
            ({"fmt": "litert", "scales": (0.75, 1.0)},
             "--scales 0.75,1: --format litert cannot shrink for TTA (no builtin antialiased "
             "resize); use scales >= 1 or --format saved_model")):
        with pytest.raises(TfpneumoError) as e:
            export(cfg, out=tmp_path / "m", rule=rule, workdir=tmp_path, **options)
        assert str(e.value) == message
        assert not (tmp_path / "m").exists()


def test_litert_without_its_runtime_is_one_line(tmp_path, monkeypatch):
    from tfpneumo.config import load_config
    from tfpneumo.inference.export import export

    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import fails
    cfg = load_config(None, ["experiment=none", f"data.cache={tmp_path / 'no-cache'}"])
    with pytest.raises(TfpneumoError, match=r"^--format litert needs the LiteRT runtime "
                       r"ai-edge-litert \(.*\); pip install 'tfpneumo\[export\]'$") as e:
        export(cfg, out=tmp_path / "m", fmt="litert", rule={"bottom": 0.5}, workdir=tmp_path)
    assert "\n" not in str(e.value) and not (tmp_path / "m").exists()


def test_a_failed_export_leaves_no_folder(real_run, tmp_path, monkeypatch):
    """The model is built in a temporary folder beside --out and renamed at the end: a write
    that fails (here a full disk) leaves neither --out nor the temporary folder."""
    import tensorflow as tf

    from tfpneumo.inference.export import export

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", full_disk)
    (tmp_path / "empty").mkdir()  # an empty --out is allowed, and stays as it was
    for out in (tmp_path / "new" / "model", tmp_path / "empty"):
        with pytest.raises(TfpneumoError, match=r"cannot write \(No space left on device\)$"):
            export(real_run.cfg, out=out, rule={"bottom": 0.5}, size=SIZE, workdir=real_run.workdir)
        assert not out.exists() or not any(out.iterdir())
        assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]

def test_export_command_prints_one_line_errors(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tfpneumo.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["export", "--out", "m", "--format", "pmml"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --format pmml: expected one of saved_model, onnx, litert"]
    result = CliRunner().invoke(app, ["export", "--out", "m", "--format", "litert",
                                      "--input-size", "1024", "-3"])
    assert result.exit_code == 1 and not (tmp_path / "m").exists()
    assert result.output.strip().splitlines() == [
        "error: --input-size 1024 -3: expected two sides H W, whole numbers from 1 to 16384"]


# Runs in a fresh Python: onnxruntime and the .onnx file only.
SERVE_ONNX = """
import sys, numpy as np, onnxruntime as ort
model, images, out = sys.argv[1:4]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
names = [o.name for o in session.get_outputs()]
pixels = np.load(images)
outputs = {}
for i in range(len(pixels.files)):
    for name, value in zip(names, session.run(None, {"images": pixels[f"image_{i}"][None]})):
        outputs[f"{name}_{i}"] = value[0]
np.savez(out, **outputs)
"""
ONNX_MISSING = [m for m in ("tf2onnx", "onnxruntime") if importlib.util.find_spec(m) is None]


def assert_served_like_predict(served, predictions, decision) -> None:
    """A converted model's outputs (``served[f"{name}_{i}"]``) against predict's: the
    probability within TOLERANCE, mask pixels the same except within 1e-5 of the threshold
    (another runtime's float arithmetic), the label probability and the decision."""
    from tfpneumo.evaluation.rules import resize_prob

    for i, p in enumerate(predictions):
        prob = resize_prob(p.prob, p.original.shape)
        assert np.abs(served[f"probability_{i}"] - prob).max() <= TOLERANCE
        differ = served[f"mask_{i}"].astype(bool) != decision.mask(p.prob, p.label_prob,
                                                                   p.original.shape)
        assert np.all(np.abs(prob[differ] - decision.bottom) <= 1e-5)
        assert abs(float(served[f"label_probability_{i}"]) - p.label_prob) <= TOLERANCE
        assert bool(served[f"positive_{i}"]) == decision.gate(p.prob, p.label_prob)


@pytest.mark.skipif(bool(ONNX_MISSING), reason=f"{', '.join(ONNX_MISSING)} not installed: "
                    "pip install 'tfpneumo[export]' to test --format onnx")
def test_onnx_in_a_fresh_process_reproduces_predict(real_run, tmp_path):
    from tfpneumo.evaluation.rules import resolve_rule
    from tfpneumo.inference.export import export

    # the geometric mean of the image and its flip (the SavedModel test has the mean)
    cfg = real_run.cfg
    predictions = predictions_of(cfg, real_run.files, real_run.workdir, merge="geomean")
    rule = {"kind": "triplet", "top": 0.5, "bottom": 0.5, "min_area": 1, "merge": "geomean"}
    decision, _ = resolve_rule(cfg.experiment, real_run.workdir, rule, SIZE * SIZE)
    out = tmp_path / "onnx"
    summary = export(cfg, out=out, fmt="onnx", rule=rule, size=SIZE, workdir=real_run.workdir)
    assert summary.startswith(f"exported 1 fold(s) (fold_0/best.keras) as onnx to {out}")
    info = json.loads((out / "export.json").read_text())
    assert info["format"] == "onnx" and info["file"] == "model.onnx"
    assert info["rule"]["rule"] == "triplet" and info["tta"]["merge"] == "geomean"
    # one graph, one input dtype: uint8 (B, H, W)
    assert list(info["inputs"]) == ["serving_default"]
    assert info["inputs"]["serving_default"]["shape"] == "(B, H, W)"

    np.savez(tmp_path / "images.npz", **{f"image_{i}": p.original for i, p in enumerate(predictions)})
    subprocess.run([sys.executable, "-c", SERVE_ONNX, str(out / "model.onnx"),
                    str(tmp_path / "images.npz"), str(tmp_path / "served.npz")], check=True,
                   capture_output=True, timeout=300)
    # onnxruntime's float arithmetic differs from TensorFlow's by ~1e-6 (measured 1.5e-6);
    # the tiny random network puts many pixels at ~0.5, so a pixel within that of the
    # threshold may fall the other way (measured: 5 of 10.5 M pixels on 10 DICOMs)
    assert_served_like_predict(np.load(tmp_path / "served.npz"), predictions, decision)


def test_the_graph_resizes_dicom_pixels_like_predict(siim_mini, tf):
    """network_pixels against resize_image (OpenCV) on a real DICOM: identical grey levels
    for the whole-number shrink factors (halving rounds half up in OpenCV, the others half to
    even); other factors differ by one level in a few pixels."""
    from tfpneumo.data.dicom import read_dicom
    from tfpneumo.data.preprocess import network_image
    from tfpneumo.inference.export import network_pixels

    pixels, _ = read_dicom(sorted((siim_mini / "dicom-images-test").glob("*.dcm"))[0])
    grey = tf.constant(pixels[None, ..., None], tf.float32)
    for size, most in ((512, 0), (256, 0), (128, 0), (1024, 0), (100, 50)):
        expected = network_image(pixels, size).astype(np.float32)
        # Python ints: the branch chosen when tracing (LiteRT); tensors: inside the graph
        for side in (1024, tf.constant(1024)):
            got = network_pixels(grey, side, side, size).numpy()[0, ..., 0]
            assert np.abs(got - expected).max() <= (1 if most else 0)
            assert np.count_nonzero(got != expected) <= most


# Runs in a fresh Python: the LiteRT runtime and the .tflite file only (no TensorFlow).
SERVE_LITERT = """
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter
model, images, out = sys.argv[1:4]
interpreter = Interpreter(model_path=model)
runners = {name: interpreter.get_signature_runner(name) for name in interpreter.get_signature_list()}
pixels = np.load(images)
outputs = {"signatures": sorted(runners)}
for i in range(len(pixels.files)):
    image = pixels[f"image_{i}"]
    runner = runners["serving_uint16" if image.dtype == np.uint16 else "serving_default"]
    for name, value in runner(images=image[None]).items():
        outputs[f"{name}_{i}"] = value[0].copy()  # the runner reuses its output buffers
np.savez(out, **outputs)
"""
LITERT_MISSING = importlib.util.find_spec("ai_edge_litert") is None


def serve_litert(model, inputs: dict, tmp_path):
    np.savez(tmp_path / "images.npz", **inputs)
    subprocess.run([sys.executable, "-c", SERVE_LITERT, str(model), str(tmp_path / "images.npz"),
                    str(tmp_path / "served.npz")], check=True, capture_output=True, timeout=300)
    return np.load(tmp_path / "served.npz")


@pytest.mark.skipif(LITERT_MISSING, reason="ai-edge-litert not installed: "
                    "pip install 'tfpneumo[export]' to test --format litert")
def test_litert_in_a_fresh_process_reproduces_predict(real_run, tmp_path):
    """model.tflite (float32, input fixed to 1 x 1024 x 1024) in the LiteRT interpreter against
    predict on two real test DICOMs, and its uint16 signature against predict on a 16-bit
    DICOM made from one of them."""
    from tfpneumo.evaluation.rules import resolve_rule
    from tfpneumo.inference.export import export

    # the seed's median of the members' masks (the SavedModel test has the mean)
    cfg, wide = real_run.cfg, real_run.wide
    predictions = predictions_of(cfg, [*real_run.files, real_run.dicom16], real_run.workdir,
                                 merge="mask_median")
    rule = {"kind": "triplet", "top": 0.5, "bottom": 0.5, "min_area": 1, "merge": "mask_median"}
    decision, _ = resolve_rule(cfg.experiment, real_run.workdir, rule, SIZE * SIZE)
    out = tmp_path / "litert"
    summary = export(cfg, out=out, fmt="litert", rule=rule, size=SIZE, workdir=real_run.workdir)
    assert summary.startswith(f"exported 1 fold(s) (fold_0/best.keras) as litert to {out}")
    assert "model.tflite (" in summary and "input (1, 1024, 1024), quantize none" in summary
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.tflite"]
    info = json.loads((out / "export.json").read_text())
    assert info["format"] == "litert" and info["file"] == "model.tflite"
    assert info["input_size"] == [1024, 1024] and info["batch"] == 1 and info["quantize"] == "none"
    assert info["rule"]["merge"] == "mask_median"
    assert info["signatures"] == ["serving_default", "serving_uint16"]
    assert [info["inputs"][s]["dtype"] for s in info["signatures"]] == ["uint8", "uint16"]
    assert {info["inputs"][s]["shape"] for s in info["signatures"]} == {"(1, 1024, 1024)"}
    assert info["check"]["max_probability_difference_vs_tensorflow"] <= TOLERANCE

    served = serve_litert(out / "model.tflite", served_inputs(predictions, {2: wide}), tmp_path)
    assert list(served["signatures"]) == ["serving_default", "serving_uint16"]
    for i, p in enumerate(predictions):
        assert served[f"probability_{i}"].shape == p.original.shape == (1024, 1024)
    # LiteRT's float arithmetic differs from TensorFlow's by ~1e-6 (measured 1.3e-6); a
    # pixel within that of the threshold may fall the other way (measured: 3 of 10.5 M
    # pixels on 10 DICOMs, none on these)
    assert_served_like_predict(served, predictions, decision)

@pytest.mark.skipif(LITERT_MISSING, reason="ai-edge-litert not installed: "
                    "pip install 'tfpneumo[export]' to test --format litert")
def test_litert_float16_costs_what_the_readme_says(real_run, tmp_path):
    """--quantize float16 (weights stored as float16, computed in float32) on two real test
    DICOMs; without the flip TTA, which halves the graph to convert (the float32 test has it)."""
    from tfpneumo.evaluation.rules import resize_prob, resolve_rule
    from tfpneumo.inference.export import export

    cfg, workdir = real_run.cfg, real_run.workdir
    predictions = predictions_of(cfg, real_run.files, workdir, hflip=False)
    rule = {"kind": "triplet", "top": 0.5, "bottom": 0.5, "min_area": 1}
    decision, _ = resolve_rule(cfg.experiment, workdir, rule, SIZE * SIZE)
    out = tmp_path / "float16"
    summary = export(cfg, out=out, fmt="litert", rule=rule, size=SIZE, input_size=(1024, 1024),
                     quantize="float16", hflip=False, workdir=workdir)
    assert "quantize float16" in summary
    info = json.loads((out / "export.json").read_text())
    assert info["quantize"] == "float16" and info["input_size"] == [1024, 1024]
    # half the float32 file (the float32 test's network: 43.5 MiB)
    assert (out / "model.tflite").stat().st_size < 0.6 * 43.5 * 2 ** 20
    served = serve_litert(out / "model.tflite", served_inputs(predictions, {}), tmp_path)
    for i, p in enumerate(predictions):
        prob = resize_prob(p.prob, p.original.shape)
        # measured on the 10 siim-mini test DICOMs: max 7.8e-4, and 3,099 of 10.5 M mask
        # pixels flipped (the tiny random network puts many pixels near the 0.5 threshold)
        assert np.abs(served[f"probability_{i}"] - prob).max() <= 2e-3
        differ = served[f"mask_{i}"].astype(bool) != decision.mask(p.prob, p.label_prob,
                                                                   p.original.shape)
        assert np.count_nonzero(differ) <= 1000
        assert np.all(np.abs(prob[differ] - decision.bottom) <= 2e-3)
        assert bool(served[f"positive_{i}"]) == decision.gate(p.prob, p.label_prob)

def test_uint16_windowing_is_read_dicoms(real_run, tf):
    """The in-graph windowing of 16-bit pixels against read_dicom (pydicom, then to_uint8) on
    a 16-bit DICOM made from a real one: the float64 one (SavedModel) and LiteRT's int32 one
    equal in every pixel, float64's off-even half levels included."""
    from tfpneumo.data.dicom import read_dicom
    from tfpneumo.inference.export import window_uint16, window_uint16_integer

    wide = real_run.wide
    expected, _ = read_dicom(real_run.dicom16)
    assert np.isin(wide, FLOAT64_OFF_EVEN).sum() > 100  # the case that needs care is there
    batch = tf.constant(wide[None, ..., None])
    for window in (window_uint16, window_uint16_integer):
        np.testing.assert_array_equal(window(batch).numpy()[0, ..., 0], expected)
    # a batch windows each image to its own range; a constant image is 0, as in to_uint8
    two = tf.constant(np.stack([wide, np.full_like(wide, 700)])[..., None])
    for window in (window_uint16, window_uint16_integer):
        got = window(two).numpy()[..., 0]
        np.testing.assert_array_equal(got[0], expected)
        assert not got[1].any()


def test_integer_windowing_rounds_every_half_level_as_float64(tf):
    """Exhaustive where it matters: every exact half level 255 d / r = k + 1/2 of every range
    r in 1..65535 (190,695 of them; numpy's float64 rounds 13,379 off even), each range one
    image holding 0, r and its half levels, against to_uint8. Elsewhere int32's rational
    rounding is exact, float64's error being far below the distance to a half level: checked
    here on every value of a few ranges."""
    import math

    from tfpneumo.data.dicom import to_uint8
    from tfpneumo.inference.export import window_uint16_integer

    ranges, offsets = [], []
    for r in range(2, 65536, 2):  # an odd range has no half level
        # 510 d = (2k + 1) r: d an odd multiple of r / gcd(510, r)
        g = math.gcd(510, r)
        ranges.append(r)
        offsets.append(np.arange(1, g + 1, 2) * (r // g))
    width = max(map(len, offsets)) + 2
    images = np.zeros((len(ranges), width), np.int32)  # 0 pads: the minimum is 0 anyway
    for row, (r, d) in enumerate(zip(ranges, offsets, strict=True)):
        images[row, 1], images[row, 2:2 + len(d)] = r, d
    got = window_uint16_integer(tf.constant(images[:, :, None, None])).numpy()[:, :, 0, 0]
    expected = np.stack([to_uint8(row[None].astype(np.uint16))[0] for row in images])
    assert len(ranges) == 32767 and sum(map(len, offsets)) == 190695
    np.testing.assert_array_equal(got, expected)
    for r in (1, 3, 4010, 4095, 65535):
        row = np.arange(r + 1, dtype=np.uint16)[None]
        np.testing.assert_array_equal(
            window_uint16_integer(tf.constant(row[..., None, None])).numpy()[0, :, 0, 0],
            to_uint8(row)[0])
