"""tfpneumo submit: run folders, thresholds, the gate, and the CSV on real stage-2 test DICOMs.

The model is a tiny random-weight UNet (resnet18, 8-16 decoder filters) saved once per test
session as a ``best.keras`` in a temporary ``runs/<experiment>/fold_0/``; format tests need
no training. Its predictions are checked against an oracle computed by hand (cv2 resize,
ImageNet normalisation in numpy, the model on the image and on its flip).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from factories import PRED_SIZE, make_run, tiny_model_file  # noqa: F401

import tfpneumo  # noqa: F401  (sets SM_FRAMEWORK before segmentation_models is imported)
from tfpneumo.config import load_config
from tfpneumo.data import rle
from tfpneumo.inference.ensemble import keep_prediction
from tfpneumo.inference.submission import (
    NO_THRESHOLDS,
    SubmitError,
    Thresholds,
    check_scales,
    ensemble_files,
    read_sample_ids,
    resolve_thresholds,
    submit,
)

MEAN = np.array((0.485, 0.456, 0.406), np.float32)
STD = np.array((0.229, 0.224, 0.225), np.float32)


# ----------------------------------------------------------------------------- shared fixtures

def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def sample_ids(siim_mini: Path) -> list[str]:
    return [row[0] for row in read_csv(siim_mini / "sample_submission.csv")[1:]]


@pytest.fixture(scope="module")
def oracle(siim_mini, tf):
    """Per test id: mask probability (256, 256) and label probability, computed by hand:
    area resize, (x/255 - mean)/std in numpy, model on the image and on its mirror."""
    import cv2
    import keras

    import tfpneumo.models.layers  # noqa: F401  (registers the custom layer)
    from tfpneumo.data.dicom import read_dicom

    net = keras.saving.load_model(tiny_model_file(), safe_mode=True, compile=False)
    ids, images = sample_ids(siim_mini), []
    for image_id in ids:
        pixels, _ = read_dicom(siim_mini / "dicom-images-test" / f"{image_id}.dcm")
        assert pixels.shape == (1024, 1024)
        images.append(cv2.resize(pixels, (PRED_SIZE, PRED_SIZE), interpolation=cv2.INTER_AREA))
    x = (np.stack(images).astype(np.float32)[..., None] / 255.0 - MEAN) / STD
    plain, mirrored = net(x, training=False), net(x[:, :, ::-1].copy(), training=False)
    mask = 0.5 * (plain["mask"].numpy()[..., 0] + mirrored["mask"].numpy()[:, :, ::-1, 0])
    label = 0.5 * (plain["label"].numpy()[:, 0] + mirrored["label"].numpy()[:, 0])
    return dict(zip(ids, mask, strict=True)), dict(zip(ids, label.tolist(), strict=True))


@pytest.fixture(scope="module")
def split_thresholds(oracle):
    """A triplet whose top falls in the widest gap between the images' maximum probabilities
    near the median: about half the images are kept (mask) and half are empty (-1)."""
    probs, _ = oracle
    peaks = np.sort([p.max() for p in probs.values()])
    gaps = [(peaks[i + 1] - peaks[i], i) for i in range(2, len(peaks) - 3)]
    gap, i = max(gaps)
    assert gap > 1e-3, f"the random model's peaks are too close to split: {peaks}"
    top = float(0.5 * (peaks[i] + peaks[i + 1]))
    return {"rule": "triplet", "top": top, "min_area": 1, "bottom": top - 0.05}


@pytest.fixture(scope="module")
def submitted(siim_mini, tmp_path_factory, split_thresholds):
    """The relative CSV written with explicit thresholds (module-scoped: several tests read
    it), plus the workdir and config for reruns."""
    workdir = tmp_path_factory.mktemp("submit")
    cfg = make_run(workdir)
    out = workdir / "sub.csv"
    summary = submit(cfg, out=out, data=siim_mini, thresholds=split_thresholds,
                     size=PRED_SIZE, batch_size=4, workdir=workdir, progress=False)
    return {"workdir": workdir, "cfg": cfg, "out": out, "summary": summary}


# ----------------------------------------------------------------------------- the CSV

def test_csv_has_every_sample_id_once_in_order_and_masks_at_1024(siim_mini, submitted):
    rows = read_csv(submitted["out"])
    assert rows[0] == ["ImageId", "EncodedPixels"]
    ids = [r[0] for r in rows[1:]]
    assert ids == sample_ids(siim_mini)
    assert len(set(ids)) == len(ids) == 10
    for _, text in rows[1:]:
        # predicted at 128 but written at the DICOM's own 1024x1024
        assert rle.decode(text, (1024, 1024), "relative").shape == (1024, 1024)
    assert "10 images" in submitted["summary"] and f"size {PRED_SIZE}" in submitted["summary"]


def test_masks_match_the_hand_computed_oracle(submitted, oracle, split_thresholds):
    import cv2

    probs, _ = oracle
    top, bottom = split_thresholds["top"], split_thresholds["bottom"]
    rows = dict(read_csv(submitted["out"])[1:])
    kept = [i for i, p in probs.items() if p.max() >= top]
    assert 2 <= len(kept) <= 8  # both branches of the gate are exercised
    for image_id, prob in probs.items():
        if image_id not in kept:
            assert rows[image_id] == "-1", image_id
            continue
        expected = cv2.resize(prob, (1024, 1024), interpolation=cv2.INTER_LINEAR) >= bottom
        got = rle.decode(rows[image_id], (1024, 1024), "relative").astype(bool)
        assert expected.any() and got.any()
        # graph vs eager float round-off can flip pixels lying on the threshold, nothing more
        assert np.count_nonzero(got != expected) <= 1e-4 * got.size, image_id


def test_evaluation_json_rerun_is_byte_identical_and_standard_rle_agrees(
        siim_mini, submitted, split_thresholds):
    workdir, cfg = submitted["workdir"], submitted["cfg"]
    best = {**split_thresholds, "label_threshold": None, "score": 0.9,
            "min_area_fraction": 1 / PRED_SIZE**2, "pixels": PRED_SIZE**2}
    (workdir / "runs" / "tiny" / "evaluation.json").write_text(json.dumps({"best": best}))
    again = workdir / "again.csv"
    summary = submit(cfg, out=again, data=siim_mini, size=PRED_SIZE, batch_size=3,
                     workdir=workdir, progress=False)
    assert "(evaluation.json)" in summary
    assert again.read_bytes() == submitted["out"].read_bytes()

    standard = workdir / "standard.csv"
    submit(cfg, out=standard, rle="standard", data=siim_mini, size=PRED_SIZE,
           workdir=workdir, progress=False)
    rel, std = read_csv(submitted["out"]), read_csv(standard)
    assert [r[0] for r in std] == [r[0] for r in rel]
    n_masks = 0
    for (image_id, a), (_, b) in zip(rel[1:], std[1:], strict=True):
        assert (a == "-1") == (b == "-1"), image_id
        np.testing.assert_array_equal(rle.decode(a, (1024, 1024), "relative"),
                                      rle.decode(b, (1024, 1024), "standard"))
        n_masks += a != "-1"
        if a != "-1":
            assert a != b  # the formats really differ (first number: 0-based vs 1-based)
    assert n_masks >= 2


# ----------------------------------------------------------------------------- errors

def _mini_sample(tmp_path: Path, ids: list[str]) -> Path:
    path = tmp_path / "sample.csv"
    path.write_text("ImageId,EncodedPixels\n" + "".join(f"{i},-1\n" for i in ids))
    return path


def test_sample_id_without_dicom_is_an_error_and_writes_nothing(siim_mini, tmp_path):
    cfg = make_run(tmp_path)
    ids = sample_ids(siim_mini)
    sample = _mini_sample(tmp_path, ids[:3] + ["ID_missing01", "ID_missing02"] + ids[3:])
    out = tmp_path / "sub.csv"
    with pytest.raises(SubmitError, match="ID_missing01, ID_missing02") as info:
        submit(cfg, out=out, data=siim_mini, sample_submission=sample,
               thresholds={"rule": "pixel", "bottom": 0.5}, size=64, workdir=tmp_path)
    assert "2 of 12" in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() and not (tmp_path / "sub.csv.tmp").exists()


def test_empty_test_folder_is_an_error(tmp_path):
    cfg = make_run(tmp_path)
    data = tmp_path / "data"
    (data / "dicom-images-test").mkdir(parents=True)
    _mini_sample(data, ["ID_0001"]).rename(data / "sample_submission.csv")
    with pytest.raises(SubmitError, match="no .dcm files"):
        submit(cfg, out=tmp_path / "sub.csv", data=data, thresholds={"bottom": 0.5},
               workdir=tmp_path)
    assert not (tmp_path / "sub.csv").exists()


def test_model_file_that_does_not_load_is_a_one_line_error(siim_mini, tmp_path):
    cfg = make_run(tmp_path, experiment="broken")
    model = tmp_path / "runs" / "broken" / "fold_0" / "best.keras"
    model.write_bytes(b"this is not a zip archive\n" * 10)
    with pytest.raises(SubmitError) as info:
        submit(cfg, out=tmp_path / "sub.csv", data=siim_mini, thresholds={"bottom": 0.5},
               size=64, workdir=tmp_path)
    message = str(info.value)
    assert message.startswith(f"{model}: cannot load model") and "\n" not in message
    assert not (tmp_path / "sub.csv").exists()


def test_fold_not_trained_is_an_error(tmp_path):
    cfg = make_run(tmp_path, folds=(0,))
    with pytest.raises(SubmitError, match=r"fold_1/result\.json: fold 1 is not trained"):
        ensemble_files(cfg, tmp_path, folds="0,1")
    # a fold folder whose training did not finish (no result.json) is not trained either
    (tmp_path / "runs" / "tiny" / "fold_2").mkdir()
    with pytest.raises(SubmitError, match="fold 2 is not trained"):
        ensemble_files(cfg, tmp_path, folds=[2])
    empty = load_config(None, ["experiment=nothing"])
    with pytest.raises(SubmitError, match="no trained fold"):
        ensemble_files(empty, tmp_path, folds="all")


def test_weights_choice(tmp_path):
    cfg = make_run(tmp_path, folds=(0, 1))
    fold0 = tmp_path / "runs" / "tiny" / "fold_0"
    shutil.copy(fold0 / "best.keras", fold0 / "swa.keras")
    files = ensemble_files(cfg, tmp_path, folds="all")  # auto: swa, else best, else final
    assert [(p.parent.name, p.name) for p in files] == [("fold_0", "swa.keras"),
                                                        ("fold_1", "best.keras")]
    assert [p.name for p in ensemble_files(cfg, tmp_path, "1", "best")] == ["best.keras"]
    with pytest.raises(SubmitError, match=r"fold_1/swa\.keras: model file not found"):
        ensemble_files(cfg, tmp_path, folds="all", weights="swa")
    with pytest.raises(SubmitError, match="--weights 'latest'"):
        ensemble_files(cfg, tmp_path, weights="latest")
    with pytest.raises(SubmitError, match="--folds 'a,b'"):
        ensemble_files(cfg, tmp_path, folds="a,b")


def test_bad_options_are_rejected_before_any_work(siim_mini, tmp_path):
    cfg = make_run(tmp_path)
    with pytest.raises(SubmitError, match="--size 100: must be a multiple of 32"):
        submit(cfg, data=siim_mini, size=100, workdir=tmp_path)
    with pytest.raises(SubmitError, match="--rle 'kaggle'"):
        submit(cfg, data=siim_mini, rle="kaggle", workdir=tmp_path)
    for scales in ("1,x", "1,0", "", (1.0, -0.5)):
        with pytest.raises(SubmitError, match="--scales .*expected positive scales"):
            submit(cfg, data=siim_mini, scales=scales, workdir=tmp_path)
    assert check_scales("1, 0.75,1.25") == check_scales([1, 0.75, 1.25]) == (1.0, 0.75, 1.25)
    with pytest.raises(SubmitError, match="pass --data"):  # no cache manifest to read it from
        submit(cfg, thresholds={"bottom": 0.5}, workdir=tmp_path)


# ----------------------------------------------------------------------------- thresholds

def test_no_thresholds_is_a_clear_error(tmp_path):
    cfg = make_run(tmp_path)
    with pytest.raises(SubmitError) as info:
        resolve_thresholds(cfg, tmp_path, None, 1024)
    assert str(info.value) == NO_THRESHOLDS
    with pytest.raises(SubmitError, match="triplet rule is missing --min-area"):
        resolve_thresholds(cfg, tmp_path, {"top": 0.6, "bottom": 0.4}, 1024)


def test_thresholds_from_evaluation_json_rescale_min_area(tmp_path):
    cfg = make_run(tmp_path)
    best = {"rule": "triplet", "top": 0.75, "top_bin": 192, "min_area": 100, "bottom": 0.375,
            "label_threshold": None, "score": 0.85, "min_area_fraction": 100 / 128**2,
            "pixels": 128**2}
    (tmp_path / "runs" / "tiny" / "evaluation.json").write_text(json.dumps({"best": best}))
    same, source = resolve_thresholds(cfg, tmp_path, None, 128)
    assert same == Thresholds("triplet", bottom=0.375, top=0.75, min_area=100)
    assert source == "evaluation.json"
    # 1024 / 128 = 8 times the side: 64 times the area
    assert resolve_thresholds(cfg, tmp_path, None, 1024)[0].min_area == 6400
    assert resolve_thresholds(cfg, tmp_path, None, 256)[0].min_area == 400
    over, source = resolve_thresholds(cfg, tmp_path, {"bottom": 0.5, "min_area": 7}, 1024)
    assert over == Thresholds("triplet", bottom=0.5, top=0.75, min_area=7)
    assert source == "evaluation.json + options"
    label, _ = resolve_thresholds(cfg, tmp_path, {"rule": "label", "label_threshold": 0.6}, 128)
    assert (label.rule, label.label_threshold, label.bottom) == ("label", 0.6, 0.375)
    with pytest.raises(SubmitError, match=r"bottom=1\.5 .*must be in \[0, 1\]"):
        resolve_thresholds(cfg, tmp_path, {"bottom": 1.5}, 128)
    (tmp_path / "runs" / "tiny" / "evaluation.json").write_text("{not json")
    with pytest.raises(SubmitError, match=r"evaluation\.json: not valid JSON"):
        resolve_thresholds(cfg, tmp_path, None, 128)


def test_gate_rules_on_a_hand_worked_map():
    prob = np.array([[0.9, 0.8, 0.1, 0.0],
                     [0.7, 0.5, 0.4, 0.0],
                     [0.0, 0.4, 0.3, 0.0],
                     [0.0, 0.0, 0.0, 0.0]], np.float32)
    # pixels >= 0.7: 3 (0.9, 0.8, 0.7); >= 0.4: 6; >= 0.5: 4 (>= is inclusive, like evaluate)
    assert keep_prediction(prob, 0.0, "triplet", top=0.7, min_area=3, bottom=0.4)
    assert not keep_prediction(prob, 0.0, "triplet", top=0.7, min_area=4, bottom=0.4)
    assert keep_prediction(prob, 0.0, "triplet", top=0.95, min_area=0, bottom=0.4)  # no gate
    assert keep_prediction(prob, 0.61, "label", label_threshold=0.6, bottom=0.4, min_area=6)
    assert not keep_prediction(prob, 0.6, "label", label_threshold=0.6, bottom=0.4)  # > only
    assert not keep_prediction(prob, 0.9, "label", label_threshold=0.6, bottom=0.4, min_area=7)
    assert keep_prediction(prob, 0.0, "pixel", bottom=0.5, min_area=4)
    assert not keep_prediction(prob, 0.0, "pixel", bottom=0.5, min_area=5)


# ----------------------------------------------------------------------------- sample file

def test_sample_submission_quirks_and_duplicates(tmp_path):
    path = tmp_path / "s.csv"
    path.write_bytes("\ufeffImageId, EncodedPixels\nID_0011fe81e, -1\n\nID_9ca06e9,-1\n"
                     .encode("utf-8"))
    assert read_sample_ids(path) == ["ID_0011fe81e", "ID_9ca06e9"]
    path.write_text("ImageId,EncodedPixels\nA,-1\nB,-1\nA,-1\n")
    with pytest.raises(SubmitError, match="row 4: ImageId A appears twice \\(first in row 2\\)"):
        read_sample_ids(path)
    path.write_text("Id,Pixels\nA,-1\n")
    with pytest.raises(SubmitError, match="no ImageId column"):
        read_sample_ids(path)
    path.write_text("ImageId,EncodedPixels\n")
    with pytest.raises(SubmitError, match="no ImageId rows"):
        read_sample_ids(path)


def test_real_stage2_sample_submission_reads(siim_dir):
    ids = read_sample_ids(siim_dir / "stage_2_sample_submission.csv")
    assert len(ids) == len(set(ids)) == 3205 and ids[0] == "ID_0011fe81e"
