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
from tfpneumo import TfpneumoError
from tfpneumo.config import load_config
from tfpneumo.data import rle
from tfpneumo.evaluation.rules import NO_RULE, Rule, resolve_rule
from tfpneumo.grammar import parse_folds, parse_scales
from tfpneumo.inference.submission import SubmitError, read_sample_ids, submit
from tfpneumo.runs import ensemble_files

# ----------------------------------------------------------------------------- shared fixtures

def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def sample_ids(siim_mini: Path) -> list[str]:
    return [row[0] for row in read_csv(siim_mini / "sample_submission.csv")[1:]]


@pytest.fixture(scope="module")
def oracle(siim_mini, tf):
    """Per test id: mask probability (256, 256) and label probability, computed by hand:
    area resize in OpenCV, the model on the grey pixels and on their mirror."""
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
    x = np.stack(images).astype(np.float32)[..., None]  # the model takes grey pixels
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
    return {"kind": "triplet", "top": top, "min_area": 1, "bottom": top - 0.05}


@pytest.fixture(scope="module")
def submitted(siim_mini, tmp_path_factory, split_thresholds):
    """The relative CSV written with explicit thresholds (module-scoped: several tests read
    it), plus the workdir and config for reruns."""
    workdir = tmp_path_factory.mktemp("submit")
    cfg = make_run(workdir)
    out = workdir / "sub.csv"
    summary = submit(cfg, out=out, data=siim_mini, rule=split_thresholds,
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
    assert "not in the sample submission" not in submitted["summary"]


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
    rule = {("rule" if k == "kind" else k): v for k, v in split_thresholds.items()}
    best = {**rule, "label_threshold": None, "score": 0.9,
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
               rule={"bottom": 0.5}, size=64, workdir=tmp_path)
    assert "2 of 12" in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() and not (tmp_path / "sub.csv.tmp").exists()


def test_test_dicoms_the_sample_does_not_ask_for_are_noted(siim_mini):
    # Issue 11: test DICOMs absent from the sample submission were ignored without a word;
    # submit's summary now ends with this note (no model needed to check it).
    from tfpneumo.inference.submission import match_test_files, unrequested_note

    test_dir = siim_mini / "dicom-images-test"
    ids = sample_ids(siim_mini)
    items, extra = match_test_files(ids[:2], test_dir)
    assert [i for i, _ in items] == ids[:2] and extra == sorted(ids[2:])
    assert unrequested_note(extra, test_dir) == (
        f"; note: 8 test DICOM(s) in {test_dir} are not in the sample submission and were not "
        f"predicted ({', '.join(extra[:5])}, ...)")
    assert match_test_files(ids, test_dir)[1] == [] and unrequested_note([], test_dir) == ""


def test_empty_test_folder_is_an_error(tmp_path):
    cfg = make_run(tmp_path)
    data = tmp_path / "data"
    (data / "dicom-images-test").mkdir(parents=True)
    _mini_sample(data, ["ID_0001"]).rename(data / "sample_submission.csv")
    with pytest.raises(SubmitError, match="no .dcm files"):
        submit(cfg, out=tmp_path / "sub.csv", data=data, rule={"bottom": 0.5},
               workdir=tmp_path)
    assert not (tmp_path / "sub.csv").exists()


def test_model_file_that_does_not_load_is_a_one_line_error(siim_mini, tmp_path):
    cfg = make_run(tmp_path, experiment="broken")
    model = tmp_path / "runs" / "broken" / "fold_0" / "best.keras"
    model.write_bytes(b"this is not a zip archive\n" * 10)
    with pytest.raises(TfpneumoError) as info:
        submit(cfg, out=tmp_path / "sub.csv", data=siim_mini, rule={"bottom": 0.5},
               size=64, workdir=tmp_path)
    message = str(info.value)
    assert message.startswith(f"{model}: cannot load model") and "\n" not in message
    assert not (tmp_path / "sub.csv").exists()


def test_fold_not_trained_is_an_error(tmp_path):
    cfg = make_run(tmp_path, folds=(0,))
    with pytest.raises(TfpneumoError, match=r"fold_1/result\.json: fold 1 is not trained"):
        ensemble_files(cfg.experiment, [0, 1], workdir=tmp_path)
    # a fold folder whose training did not finish (no result.json) is not trained either
    (tmp_path / "runs" / "tiny" / "fold_2").mkdir()
    with pytest.raises(TfpneumoError, match="fold 2 is not trained"):
        ensemble_files(cfg.experiment, [2], workdir=tmp_path)
    empty = load_config(None, ["experiment=nothing"])
    with pytest.raises(TfpneumoError, match="no trained fold"):
        ensemble_files(empty.experiment, "all", workdir=tmp_path)


def test_weights_choice(tmp_path):
    cfg = make_run(tmp_path, folds=(0, 1))
    fold0 = tmp_path / "runs" / "tiny" / "fold_0"
    shutil.copy(fold0 / "best.keras", fold0 / "swa.keras")
    files = ensemble_files(cfg.experiment, "all", workdir=tmp_path)  # auto: swa, topk, best, final
    assert [(p.parent.name, p.name) for p in files] == [("fold_0", "swa.keras"),
                                                        ("fold_1", "best.keras")]
    fold1 = tmp_path / "runs" / "tiny" / "fold_1"
    shutil.copy(fold1 / "best.keras", fold1 / "topk.keras")  # an averaged network beats best
    shutil.copy(fold1 / "best.keras", fold0 / "topk.keras")  # and SWA beats top-k
    files = ensemble_files(cfg.experiment, "all", workdir=tmp_path)
    assert [p.name for p in files] == ["swa.keras", "topk.keras"]
    assert [p.name for p in ensemble_files(cfg.experiment, [1], "best", tmp_path)] == ["best.keras"]
    with pytest.raises(TfpneumoError, match=r"fold_1/swa\.keras: model file not found"):
        ensemble_files(cfg.experiment, "all", "swa", tmp_path)
    with pytest.raises(TfpneumoError, match="--weights 'latest'"):
        ensemble_files(cfg.experiment, "all", "latest", tmp_path)
    with pytest.raises(TfpneumoError, match="--folds 'a,b'"):
        parse_folds("a,b")
    assert parse_folds(" all ") == "all" and parse_folds("2,0,2") == [0, 2]


def test_bad_options_are_rejected_before_any_work(siim_mini, tmp_path):
    cfg = make_run(tmp_path)
    with pytest.raises(TfpneumoError, match="--size 100: must be a multiple of 32"):
        submit(cfg, data=siim_mini, size=100, workdir=tmp_path)
    with pytest.raises(SubmitError, match="--rle 'kaggle'"):
        submit(cfg, data=siim_mini, rle="kaggle", workdir=tmp_path)
    with pytest.raises(TfpneumoError, match="--scales 1.0,-0.5: must be positive"):
        submit(cfg, data=siim_mini, scales=(1.0, -0.5), workdir=tmp_path)
    for scales in ("1,x", "1,0", ""):
        with pytest.raises(TfpneumoError, match="--scales .*expected positive scales"):
            parse_scales(scales)
    assert parse_scales("1, 0.75,1.25") == parse_scales([1, 0.75, 1.25]) == (1.0, 0.75, 1.25)
    with pytest.raises(SubmitError, match="pass --data"):  # no cache manifest to read it from
        submit(cfg, rule={"bottom": 0.5}, workdir=tmp_path)


# ----------------------------------------------------------------------------- thresholds

def test_no_thresholds_is_a_clear_error(tmp_path):
    cfg = make_run(tmp_path)
    with pytest.raises(TfpneumoError) as info:
        resolve_rule(cfg.experiment, tmp_path, None, 1024**2)
    assert str(info.value) == NO_RULE
    with pytest.raises(TfpneumoError, match="triplet rule is missing --min-area"):
        resolve_rule(cfg.experiment, tmp_path, {"top": 0.6, "bottom": 0.4}, 1024**2)
    # --bottom alone is the plain rule: a triplet with top = bottom and no area gate
    assert resolve_rule(cfg.experiment, tmp_path, {"bottom": 0.4})[0] == Rule(
        "triplet", bottom=0.4, top=0.4, min_area=0)


def test_thresholds_from_evaluation_json_rescale_min_area(tmp_path):
    cfg = make_run(tmp_path)
    best = {"rule": "triplet", "top": 0.75, "top_bin": 192, "min_area": 100, "bottom": 0.375,
            "label_threshold": None, "score": 0.85, "min_area_fraction": 100 / 128**2,
            "pixels": 128**2}
    (tmp_path / "runs" / "tiny" / "evaluation.json").write_text(json.dumps({"best": best}))
    same, source = resolve_rule(cfg.experiment, tmp_path, None, 128**2)
    assert same == Rule("triplet", bottom=0.375, top=0.75, min_area=100)
    assert source == "evaluation.json"
    # 1024 / 128 = 8 times the side: 64 times the area
    assert resolve_rule(cfg.experiment, tmp_path, None, 1024**2)[0].min_area == 6400
    assert resolve_rule(cfg.experiment, tmp_path, None, 256**2)[0].min_area == 400
    over, source = resolve_rule(cfg.experiment, tmp_path, {"bottom": 0.5, "min_area": 7}, 1024**2)
    assert over == Rule("triplet", bottom=0.5, top=0.75, min_area=7)
    assert source == "evaluation.json + options"
    label, _ = resolve_rule(cfg.experiment, tmp_path, {"kind": "label", "label_threshold": 0.6}, 128**2)
    assert (label.kind, label.label_threshold, label.bottom) == ("label", 0.6, 0.375)
    with pytest.raises(TfpneumoError, match=r"bottom=1\.5 .*must be in \[0, 1\]"):
        resolve_rule(cfg.experiment, tmp_path, {"bottom": 1.5}, 128**2)
    (tmp_path / "runs" / "tiny" / "evaluation.json").write_text("{not json")
    with pytest.raises(TfpneumoError, match=r"evaluation\.json: not valid JSON"):
        resolve_rule(cfg.experiment, tmp_path, None, 128**2)


def test_a_weights_kind_uses_only_its_own_rule(tmp_path):
    """--weights topk never applies the rule chosen on another network's statistics."""
    cfg = make_run(tmp_path)
    run = tmp_path / "runs" / "tiny"
    best = {"rule": "triplet", "top": 0.75, "min_area": 100, "bottom": 0.375, "score": 0.85,
            "pixels": 128**2}
    (run / "evaluation.json").write_text(json.dumps({"best": best}))
    with pytest.raises(TfpneumoError, match=r"evaluation_topk\.json not found: .*tfpneumo "
                                            r"evaluate --weights topk") as info:
        resolve_rule(cfg.experiment, tmp_path, None, 128**2, "topk")
    assert "\n" not in str(info.value)
    (run / "evaluation_topk.json").write_text(json.dumps({"best": {**best, "top": 0.6}}))
    rule, source = resolve_rule(cfg.experiment, tmp_path, None, 128**2, "topk")
    assert rule == Rule("triplet", bottom=0.375, top=0.6, min_area=100)
    assert source == "evaluation_topk.json"
    assert resolve_rule(cfg.experiment, tmp_path, None, 128**2)[0].top == 0.75  # auto's own


def test_gate_rules_on_a_hand_worked_map():
    prob = np.array([[0.9, 0.8, 0.1, 0.0],
                     [0.7, 0.5, 0.4, 0.0],
                     [0.0, 0.4, 0.3, 0.0],
                     [0.0, 0.0, 0.0, 0.0]], np.float32)
    # pixels >= 0.7: 3 (0.9, 0.8, 0.7); >= 0.4: 6; >= 0.5: 4 (>= is inclusive, like evaluate)
    assert Rule("triplet", top=0.7, min_area=3, bottom=0.4).gate(prob, 0.0)
    assert not Rule("triplet", top=0.7, min_area=4, bottom=0.4).gate(prob, 0.0)
    assert Rule("triplet", top=0.95, min_area=0, bottom=0.4).gate(prob, 0.0)  # no gate
    assert Rule("label", label_threshold=0.6, bottom=0.4, min_area=6).gate(prob, 0.61)
    assert not Rule("label", label_threshold=0.6, bottom=0.4).gate(prob, 0.6)  # > only
    assert not Rule("label", label_threshold=0.6, bottom=0.4, min_area=7).gate(prob, 0.9)
    plain = Rule("triplet", top=0.5, bottom=0.5, min_area=4)  # the plain rule, area-gated
    assert plain.gate(prob, 0.0)
    assert not Rule("triplet", top=0.5, bottom=0.5, min_area=5).gate(prob, 0.0)
    assert plain.mask(prob, 0.0).sum() == 4  # mask: prob >= bottom at the map's size
    assert plain.mask(prob, 0.0, (8, 8)).shape == (8, 8)
    with pytest.raises(TfpneumoError, match="rule 'pixel': expected one of triplet, label"):
        Rule("pixel", bottom=0.5)


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


def test_a_second_submit_to_the_same_file_is_refused(siim_mini, tmp_path):
    """While one submit writes sub.csv (it holds sub.csv.lock), another is refused in one line
    and leaves the file, its temporary and the lock alone."""
    from tfpneumo.runs import Locked, locked

    cfg = make_run(tmp_path)
    out = tmp_path / "sub.csv"
    with locked(tmp_path / "sub.csv.lock", "submit"):
        with pytest.raises(Locked, match=rf"^{tmp_path}: submit refused, submit of process \d+"):
            submit(cfg, out=out, data=siim_mini, rule={"bottom": 0.5}, size=64,
                   workdir=tmp_path, progress=False)
        assert (tmp_path / "sub.csv.lock").exists()
    assert not out.exists() and not (tmp_path / "sub.csv.tmp").exists()
    assert not (tmp_path / "sub.csv.lock").exists()
