"""Hostile input: corrupted real DICOMs, ids that look like paths, a .keras file with a Lambda.

Already covered elsewhere (not repeated here): random strings and integer lists given to
``rle.decode`` (tests/test_rle.py, hypothesis), YAML with Python tags (tests/test_config.py),
path-like ids in ``labels.read_labels`` for '/', '\\', '..' and '' (tests/test_labels.py).
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tfpneumo  # noqa: F401  (sets SM_FRAMEWORK before segmentation_models is imported)
from tfpneumo import TfpneumoError
from tfpneumo.config import load_config
from tfpneumo.data.dicom import DicomError, read_dicom, read_header
from tfpneumo.data.labels import LabelError, read_label_table, read_labels

BAD_IDS = ["../../evil", "a/b", "a\\b", "a\x00b", "..", "/abs"]
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


# ----------------------------------------------------------------------------- corrupt DICOMs

class _Blobs(list):
    """File contents with a short repr: hypothesis prints the arguments of a failing case."""

    def __repr__(self) -> str:
        return f"<{len(self)} DICOM files>"


@pytest.fixture(scope="module")
def blobs(siim_mini) -> list[bytes]:
    """The bytes of 3 real train and 2 real test DICOMs (each ~100-200 KB, JPEG-Baseline)."""
    train = sorted((siim_mini / "dicom-images-train").rglob("*.dcm"))[:3]
    test = sorted((siim_mini / "dicom-images-test").rglob("*.dcm"))[:2]
    return _Blobs(p.read_bytes() for p in train + test)


@pytest.fixture(scope="module")
def scratch():
    """A folder for the corrupted copies (module-scoped: hypothesis reruns the test body)."""
    folder = Path(tempfile.mkdtemp(prefix="tfpneumo-hostile-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _pixel_start(blob: bytes) -> int:
    """Offset of the JPEG stream: corruptions before it hit the DICOM header."""
    soi = blob.find(b"\xff\xd8\xff")
    return soi if soi > 0 else len(blob)


def _check_read(path: Path) -> None:
    """The contract: (H, W) uint8 pixels, or a DicomError whose one-line message names the
    file; any other exception type propagates and fails the test. read_header (used by
    prepare to plan) keeps the same contract."""
    try:
        header = read_header(path)
    except DicomError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
    else:
        assert isinstance(header, dict) and isinstance(header["height"], int)
    try:
        pixels, meta = read_dicom(path)
    except DicomError as e:
        assert str(path) in str(e), str(e)
        assert "\n" not in str(e), str(e)
        return
    assert isinstance(pixels, np.ndarray)
    assert pixels.dtype == np.uint8 and pixels.ndim == 2 and pixels.size > 0
    assert isinstance(meta, dict)


# Offsets are drawn as fractions so that one strategy fits every file; a third of them land in
# the (small) header, where pydicom's element parser is hit rather than the JPEG decoder.
_offsets = st.tuples(st.booleans(), st.floats(0.0, 1.0, exclude_max=True))


def _offset(blob: bytes, where: tuple[bool, float]) -> int:
    header, frac = where
    return int(frac * (_pixel_start(blob) if header else len(blob)))


@FUZZ
@given(which=st.integers(0, 4),
       edits=st.lists(st.tuples(_offsets, st.integers(0, 255)), min_size=1, max_size=8))
def test_overwritten_bytes(blobs, scratch, which, edits):
    data = bytearray(blobs[which])
    for where, value in edits:
        data[_offset(data, where)] = value
    path = scratch / "overwritten.dcm"
    path.write_bytes(bytes(data))
    _check_read(path)


@FUZZ
@given(which=st.integers(0, 4), where=_offsets, flip=st.integers(0, 7))
def test_flipped_bit(blobs, scratch, which, where, flip):
    data = bytearray(blobs[which])
    data[_offset(data, where)] ^= 1 << flip
    path = scratch / "flipped.dcm"
    path.write_bytes(bytes(data))
    _check_read(path)


@FUZZ
@given(which=st.integers(0, 4), where=_offsets)
def test_truncated(blobs, scratch, which, where):
    blob = blobs[which]
    path = scratch / "truncated.dcm"
    path.write_bytes(blob[:_offset(blob, where)])
    _check_read(path)


@FUZZ
@given(which=st.integers(0, 4), where=_offsets, garbage=st.binary(min_size=1, max_size=64))
def test_inserted_garbage(blobs, scratch, which, where, garbage):
    blob = blobs[which]
    at = _offset(blob, where)
    path = scratch / "inserted.dcm"
    path.write_bytes(blob[:at] + garbage + blob[at:])
    _check_read(path)


def test_uncorrupted_copy_still_reads(blobs, scratch):
    # The fuzz tests accept both outcomes; this pins that the untouched bytes decode.
    path = scratch / "intact.dcm"
    path.write_bytes(blobs[0])
    pixels, _ = read_dicom(path)
    assert pixels.shape == (1024, 1024) and pixels.dtype == np.uint8


# ----------------------------------------------------------------------------- path-like ids

def _write_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


@pytest.mark.parametrize("image_id", BAD_IDS)
def test_label_ids_that_look_like_paths(tmp_path, image_id):
    path = tmp_path / "labels.csv"
    _write_csv(path, [["ImageId", "EncodedPixels"], ["ok", "-1"], [image_id, "5 2"]])
    with pytest.raises(LabelError, match=r"labels\.csv: row 3: ImageId .*contains"):
        read_labels(path)
    table = read_label_table(path)  # the lenient reader keeps the good id, lists the bad one
    assert list(table.rows) == ["ok"]
    assert [(i, line) for i, line, _ in table.problems] == [(image_id, 3)]


def test_prepare_skips_path_like_label_ids(siim_mini, tmp_path):
    """prepare lists path-like CSV ids and DICOM stems as skipped; it writes no file anywhere
    but its output folder (the ids never become paths)."""
    from tfpneumo.data.prepare import prepare_cache

    data = tmp_path / "data"
    train = data / "dicom-images-train"
    train.mkdir(parents=True)
    rows = list(csv.reader(open(siim_mini / "train-rle.csv", encoding="utf-8-sig")))[1:]
    by_id: dict[str, str] = {}
    for image_id, value in rows:
        by_id.setdefault(image_id.strip(), value.strip())
    files = {p.stem: p for p in (siim_mini / "dicom-images-train").rglob("*.dcm")}
    pos = sorted(i for i, v in by_id.items() if v != "-1")[:2]
    neg = sorted(i for i, v in by_id.items() if v == "-1")[:2]
    for image_id in pos + neg:
        shutil.copy(files[image_id], train / f"{image_id}.dcm")
    # a DICOM whose stem contains '..' is refused by find_dicoms, not opened as a path
    shutil.copy(files[neg[0]], train / "x..y.dcm")
    lines = [["ImageId", "EncodedPixels"]] + [[i, v] for i, v in rows if i.strip() in pos + neg]
    lines += [[bad, "-1"] for bad in BAD_IDS] + [["x..y", "-1"]]
    _write_csv(data / "train-rle.csv", lines)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    cfg = load_config(None, ["prepare.size=64", "prepare.folds=2", "prepare.workers=1"])
    out = tmp_path / "cache"
    summary = prepare_cache(data, out, cfg, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = [s["reason"] for s in manifest["skipped"]]
    assert manifest["counts"]["train"] == 4, summary
    assert sum("contains '/', '\\', '..' or NUL" in r for r in reasons) == len(BAD_IDS) + 2
    assert any(s["file"].endswith("x..y.dcm") for s in manifest["skipped"])
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert [p for p in after if p not in before and p.parts[0] != "cache"] == []
    assert not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize("image_id", BAD_IDS)
def test_submit_refuses_path_like_sample_ids(siim_mini, tmp_path, image_id):
    """submit builds no path from sample ids (DICOMs are found by walking the folder), and a
    path-like id stops it with a one-line error naming the row before anything is loaded or
    written."""
    from tfpneumo.inference.submission import SubmitError, submit

    sample = tmp_path / "sample.csv"
    ids = [r[0] for r in csv.reader(open(siim_mini / "sample_submission.csv",
                                         encoding="utf-8-sig"))][1:]
    _write_csv(sample, [["ImageId", "EncodedPixels"], [ids[0], "-1"], [image_id, "-1"]])
    cfg = load_config(None, [f"data.cache={tmp_path / 'no-cache'}"])
    out = tmp_path / "sub.csv"
    with pytest.raises(SubmitError, match=r"sample\.csv: row 3: ImageId .*contains") as info:
        submit(cfg, out=out, data=siim_mini, sample_submission=sample, size=64,
               rule={"bottom": 0.5}, workdir=tmp_path, progress=False)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.csv"]


# ----------------------------------------------------------------------------- Lambda in .keras

def test_keras_file_with_lambda_is_refused(tmp_path, tf):
    """A .keras whose Lambda would run arbitrary code when loaded is refused by the project's
    loader (safe_mode) with a one-line error; the code does not run. As an oracle that the
    payload is live, unsafe loading (keras, not the project) does run it."""
    import keras

    from tfpneumo.models.saved import load_network
    from tfpneumo.runs import ensemble_files

    marker = tmp_path / "pwned"
    # The payload's path is a constant of the lambda's own code, so it survives marshalling.
    payload = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")
    from tfpneumo.models.layers import GreyPixels

    inputs = keras.Input((32, 32, 1))  # a file of this version: it records the convention
    mask = keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")(
        keras.layers.Lambda(payload)(GreyPixels()(inputs)))
    label = keras.layers.Dense(1, activation="sigmoid", name="label")(
        keras.layers.GlobalAveragePooling2D()(mask))
    net = keras.Model(inputs, {"mask": mask, "label": label})
    fold = tmp_path / "runs" / "evil" / "fold_0"
    fold.mkdir(parents=True)
    net.save(fold / "best.keras")
    (fold / "result.json").write_text(json.dumps({"fold": 0}))
    marker.unlink()  # building the model ran the lambda once

    cfg = load_config(None, ["experiment=evil", f"data.cache={tmp_path / 'no-cache'}"])
    with pytest.raises(TfpneumoError) as info:
        [load_network(p) for p in ensemble_files(cfg.experiment, "all", "best", tmp_path)]
    message = str(info.value)
    assert message.startswith(f"{fold / 'best.keras'}: cannot load model")
    assert "\n" not in message and "Lambda" in message
    assert not marker.exists()

    keras.saving.load_model(fold / "best.keras", safe_mode=False, compile=False)
    assert marker.exists()
