"""tfpneumo export: the SavedModel, loaded in a fresh process, reproduces predict."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from factories import make_run

import tfpneumo  # noqa: F401  (sets SM_FRAMEWORK before segmentation_models is imported)
from tfpneumo import TfpneumoError

SIZE = 64  # prediction size inside the graph: small keeps the test fast
TOLERANCE = 1e-4  # max |probability - predict's| allowed; measured: 1.2e-7 SavedModel,
# 1.5e-6 ONNX (10 siim-mini test DICOMs, sizes 64 and 128; 6.6e-6 ONNX at 512)

# Runs in a fresh Python: only TensorFlow and the exported folder, no tfpneumo network code.
SERVE = """
import sys, numpy as np, tensorflow as tf
model, images, out = sys.argv[1:4]
serve = tf.saved_model.load(model).signatures["serving_default"]
pixels = np.load(images)
outputs = {}
for i in range(len(pixels.files)):
    for name, value in serve(images=tf.constant(pixels[f"image_{i}"][None])).items():
        outputs[f"{name}_{i}"] = value.numpy()[0]
# (B, H, W, 1) is taken too, and a batch of two
pair = np.stack([pixels["image_0"], pixels["image_1"]])[..., None]
outputs["pair"] = serve(images=tf.constant(pair))["probability"].numpy()
try:  # three channels: refused, saying what the input must be
    serve(images=tf.zeros((1, 8, 8, 3), tf.uint8))
except tf.errors.InvalidArgumentError as e:
    outputs["refused"] = "images must be uint8 (B, H, W) or (B, H, W, 1)" in str(e)
np.savez(out, **outputs)
"""


def test_saved_model_in_a_fresh_process_reproduces_predict(siim_mini, tmp_path):
    """The library functions predict uses (Predictor, resize_prob, Rule.mask) against the
    exported serving_default signature on three real test DICOMs (1024 x 1024 uint8)."""
    from tfpneumo.evaluation.rules import resize_prob, resolve_rule
    from tfpneumo.inference.ensemble import predictor
    from tfpneumo.inference.export import export
    from tfpneumo.inference.images import dicom_items

    cfg = make_run(tmp_path)
    files = sorted((siim_mini / "dicom-images-test").glob("*.dcm"))[:3]
    predictions = list(predictor(cfg, size=SIZE, workdir=tmp_path).predict(dicom_items(files)))
    # the label rule with its threshold between the images' label probabilities: the
    # exported gate must say yes to some images and no to others
    labels = sorted(p.label_prob for p in predictions)
    rule = {"kind": "label", "label_threshold": round(0.5 * (labels[0] + labels[1]), 7),
            "bottom": 0.5, "min_area": 1}
    decision, _ = resolve_rule(cfg.experiment, tmp_path, rule, SIZE * SIZE)
    assert {decision.gate(p.prob, p.label_prob) for p in predictions} == {True, False}

    out = tmp_path / "model"
    summary = export(cfg, out=out, rule=rule, size=SIZE, workdir=tmp_path)
    assert summary.startswith(f"exported 1 fold(s) (fold_0/best.keras) as saved_model to {out}")
    info = json.loads((out / "export.json").read_text())
    assert info["folds"] == [0] and info["networks"] == ["fold_0/best.keras"]
    assert info["weights"] == "auto" and info["weights_kinds"] == ["best"] and info["size"] == SIZE
    assert info["rule"] == {"rule": "label", "bottom": 0.5, "top": None, "min_area": 1,
                            "label_threshold": rule["label_threshold"]}
    assert info["rule_source"] == "options" and info["tta"] == {"hflip": True, "scales": [1.0]}
    assert info["input"]["dtype"] == "uint8" and info["signature"] == "serving_default"
    assert info["input"]["network_convention"] == "grey-pixels-0-255"
    assert info["run"] == str((tmp_path / "runs" / "tiny").resolve())

    np.savez(tmp_path / "images.npz", **{f"image_{i}": p.original for i, p in enumerate(predictions)})
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


def test_export_command_prints_one_line_errors(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tfpneumo.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["export", "--out", "m", "--format", "pmml"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --format pmml: expected one of saved_model, onnx"]


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


@pytest.mark.skipif(bool(ONNX_MISSING), reason=f"{', '.join(ONNX_MISSING)} not installed: "
                    "pip install 'tfpneumo[export]' to test --format onnx")
def test_onnx_in_a_fresh_process_reproduces_predict(siim_mini, tmp_path):
    from tfpneumo.evaluation.rules import resize_prob, resolve_rule
    from tfpneumo.inference.ensemble import predictor
    from tfpneumo.inference.export import export
    from tfpneumo.inference.images import dicom_items

    cfg = make_run(tmp_path)
    files = sorted((siim_mini / "dicom-images-test").glob("*.dcm"))[:2]
    predictions = list(predictor(cfg, size=SIZE, workdir=tmp_path).predict(dicom_items(files)))
    rule = {"kind": "triplet", "top": 0.5, "bottom": 0.5, "min_area": 1}
    decision, _ = resolve_rule(cfg.experiment, tmp_path, rule, SIZE * SIZE)
    out = tmp_path / "onnx"
    summary = export(cfg, out=out, fmt="onnx", rule=rule, size=SIZE, workdir=tmp_path)
    assert summary.startswith(f"exported 1 fold(s) (fold_0/best.keras) as onnx to {out}")
    info = json.loads((out / "export.json").read_text())
    assert info["format"] == "onnx" and info["file"] == "model.onnx"
    assert info["input"]["shape"] == "(B, H, W)" and info["rule"]["rule"] == "triplet"

    np.savez(tmp_path / "images.npz", **{f"image_{i}": p.original for i, p in enumerate(predictions)})
    subprocess.run([sys.executable, "-c", SERVE_ONNX, str(out / "model.onnx"),
                    str(tmp_path / "images.npz"), str(tmp_path / "served.npz")], check=True,
                   capture_output=True, timeout=300)
    served = np.load(tmp_path / "served.npz")
    for i, p in enumerate(predictions):
        prob = resize_prob(p.prob, p.original.shape)
        assert np.abs(served[f"probability_{i}"] - prob).max() <= TOLERANCE
        # onnxruntime's float arithmetic differs from TensorFlow's by ~1e-6 (measured 1.5e-6);
        # the tiny random network puts many pixels at ~0.5, so a pixel within that of the
        # threshold may fall the other way (measured: 5 of 10.5 M pixels on 10 DICOMs)
        differ = served[f"mask_{i}"].astype(bool) != decision.mask(p.prob, p.label_prob,
                                                                   p.original.shape)
        assert np.all(np.abs(prob[differ] - decision.bottom) <= 1e-5)
        assert abs(float(served[f"label_probability_{i}"]) - p.label_prob) <= TOLERANCE
        assert bool(served[f"positive_{i}"]) == decision.gate(p.prob, p.label_prob)


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
        got = network_pixels(grey, 1024, 1024, size).numpy()[0, ..., 0]
        expected = network_image(pixels, size).astype(np.float32)
        assert np.abs(got - expected).max() <= (1 if most else 0)
        assert np.count_nonzero(got != expected) <= most
