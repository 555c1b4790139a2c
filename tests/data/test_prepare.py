"""``tfpneumo prepare`` on the real siim-mini files: records, masks, folds, skips, resume, CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tfpneumo.config import Config, PrepareConfig
from tfpneumo.data import records, rle
from tfpneumo.data.folds import FoldError, assign_folds
from tfpneumo.data.labels import LabelError
from tfpneumo.data.prepare import PrepareError, prepare_cache
from tfpneumo.data.preprocess import resize_mask

FOUR_ROWS = "1.2.276.0.7230010.3.1.4.8323329.307.1517875162.311533"


def _cfg(**prepare) -> Config:
    return Config(prepare=PrepareConfig(**{"workers": 1, **prepare}))


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        return [(a.strip(), b.strip()) for a, b in list(csv.reader(f))[1:]]


def _read_cache(out: Path, split: str) -> dict[str, dict]:
    """Every record of ``split`` parsed by records.parse_example, by image id."""
    import tensorflow as tf

    found = {}
    for shard in records.list_shards(out, split):
        for ex in tf.data.TFRecordDataset(shard).map(records.parse_example):
            image_id = ex["image_id"].numpy().decode()
            assert image_id not in found
            found[image_id] = {"image": ex["image"].numpy()[..., 0],
                               "mask": ex["mask"].numpy()[..., 0],
                               "has_mask": int(ex["has_mask"]), "fold": int(ex["fold"]),
                               "shard": Path(shard).name}
    return found


def _block_mean(a: np.ndarray, size: int) -> np.ndarray:
    """Independent downscale by an integer factor: the mean of each block."""
    f = a.shape[0] // size
    return a.astype(np.float64).reshape(size, f, size, f).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def mini256(siim_mini, tmp_path_factory, tf) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("cache") / "mini256"
    summary = prepare_cache(siim_mini, out, _cfg(size=256, shard_size=4), progress=False)
    return out, summary


def test_mini_counts_manifest_index(mini256, siim_mini):
    out, summary = mini256
    assert "48 train images (15 positive, 33 negative)" in summary and "10 test" in summary
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 48, "test": 10, "positive": 15, "negative": 33,
                                  "skipped": 0}
    assert manifest["size"] == 256 and manifest["folds"] == 5 and manifest["skipped"] == []
    assert manifest["data_dir"] == str(siim_mini.resolve())
    assert sum(s["count"] for s in manifest["shards"]) == 58
    assert {s["name"] for s in manifest["shards"]} == {
        Path(p).name for split in ("train", "test") for p in records.list_shards(out, split)}
    assert all(s["count"] <= 4 for s in manifest["shards"])

    with open(out / "index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    assert len(index) == 58
    from tfpneumo.data.dicom import find_dicoms, read_header

    files = {**find_dicoms(siim_mini / "dicom-images-train"),
             **find_dicoms(siim_mini / "dicom-images-test")}
    n_rows: dict[str, int] = {}
    for image_id, value in _csv_rows(siim_mini / "train-rle.csv"):
        n_rows[image_id] = n_rows.get(image_id, 0) + (value != "-1")
    for row in index:
        header = read_header(files[row["image_id"]])
        assert row["patient_id"] == header["patient_id"]
        assert row["patient_age"] == str(header["patient_age"])
        assert (row["patient_sex"], row["view_position"]) == (header["patient_sex"],
                                                              header["view_position"])
        if row["split"] == "train":
            assert int(row["n_rows"]) == n_rows[row["image_id"]]
            assert int(row["has_mask"]) == (n_rows[row["image_id"]] > 0)
        else:
            assert (row["fold"], row["has_mask"], row["n_rows"]) == ("-1", "-1", "0")
    saved = (out / "prepare.yaml").read_text()
    assert "size: 256" in saved


def test_records_match_dicoms_and_csv(mini256, siim_mini):
    import pydicom

    out, _ = mini256
    train, test = _read_cache(out, "train"), _read_cache(out, "test")
    assert len(train) == 48 and len(test) == 10
    rows: dict[str, list[str]] = {}
    for image_id, value in _csv_rows(siim_mini / "train-rle.csv"):
        rows.setdefault(image_id, [])
        if value != "-1":
            rows[image_id].append(value)
    assert set(train) == set(rows)
    with open(out / "index.csv", newline="") as f:
        index = {row["image_id"]: row for row in csv.DictReader(f)}
    paths = {p.stem: p for p in siim_mini.rglob("*.dcm")}
    for image_id, rec in {**train, **test}.items():
        assert rec["image"].shape == (256, 256) and rec["image"].dtype == np.uint8
        assert index[image_id]["shard"] == rec["shard"]
        assert int(index[image_id]["fold"]) == rec["fold"]
        pixels = pydicom.dcmread(paths[image_id]).pixel_array
        expected = np.rint(_block_mean(pixels, 256))
        assert np.abs(rec["image"] - expected).max() <= 1
        if image_id in test:
            assert rec["has_mask"] == -1 and rec["fold"] == -1 and rec["shard"].startswith("test")
            assert not rec["mask"].any()
            continue
        positive = bool(rows[image_id])
        assert rec["has_mask"] == int(positive)
        assert rec["shard"] == records.train_shard_name(rec["fold"], positive,
                                                        int(rec["shard"][-14:-9]))
        full = np.zeros((1024, 1024), np.uint8)
        for text in rows[image_id]:
            full |= rle.decode(text, (1024, 1024))
        np.testing.assert_array_equal(rec["mask"], _block_mean(full, 256) >= 0.5)
        assert rec["mask"].any() == positive

    # The image with 4 annotation rows holds their union, bigger than any single row.
    singles = [_block_mean(rle.decode(t, (1024, 1024)), 256) >= 0.5 for t in rows[FOUR_ROWS]]
    assert len(singles) == 4
    union = train[FOUR_ROWS]["mask"].astype(bool)
    assert all((s <= union).all() and s.sum() < union.sum() for s in singles)


def test_folds_are_stratified(mini256):
    out, _ = mini256
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["fold_counts"]
    assert sorted(counts) == ["0", "1", "2", "3", "4"]
    assert all(c["positive"] == 3 for c in counts.values())  # 15 positives / 5 folds
    assert sorted(c["negative"] for c in counts.values()) == [6, 6, 7, 7, 7]  # 33 / 5


def test_resize_mask_threshold_and_slivers():
    mask = np.zeros((8, 8), np.uint8)
    mask[0:2, 0:1] = 1  # a quarter of the (0, 0) 4x4 block: dropped by the 0.5 threshold...
    mask[4:8, 4:6] = 1  # half of the (1, 1) block: kept
    np.testing.assert_array_equal(resize_mask(mask, 2), [[0, 0], [0, 1]])
    sliver = np.zeros((8, 8), np.uint8)
    sliver[:, 3] = 1  # ...but a mask that would vanish keeps every pixel it touches
    np.testing.assert_array_equal(resize_mask(sliver, 2), [[1, 0], [1, 0]])
    up = resize_mask(np.eye(2, dtype=np.uint8), 4)
    assert up.shape == (4, 4) and up[0, 0] == 1 and up[0, 3] == 0


def test_group_by_patient_keeps_patients_in_one_fold():
    rng = np.random.default_rng(0)
    ids = [f"img{i:03d}" for i in range(120)]
    groups = [f"p{rng.integers(40)}" for _ in ids]
    has_mask = [int(g in {f"p{k}" for k in range(12)}) for g in groups]
    folds = assign_folds(ids, has_mask, groups, 4, True, 7)
    for g in set(groups):
        assert len({folds[i] for i, gg in zip(ids, groups, strict=True) if gg == g}) == 1
    assert all(any(folds[i] == f and m for i, m in zip(ids, has_mask, strict=True))
               for f in range(4))
    assert folds == assign_folds(ids, has_mask, groups, 4, True, 7)  # deterministic
    with pytest.raises(FoldError, match="only 3 positive training image"):
        assign_folds(ids[:10], [1, 1, 1] + [0] * 7, ids[:10], 4, False, 0)


def _mini_copy(siim_mini: Path, root: Path, n_pos: int, n_neg: int) -> tuple[list, list]:
    """A SIIM folder with some real DICOMs; returns (positive ids, negative ids) copied."""
    rows = _csv_rows(siim_mini / "train-rle.csv")
    pos = sorted({i for i, v in rows if v != "-1"})[:n_pos]
    neg = sorted({i for i, v in rows if v == "-1"})[:n_neg]
    for path in (siim_mini / "dicom-images-train").rglob("*.dcm"):
        if path.stem in pos or path.stem in neg:
            dest = root / "dicom-images-train" / path.relative_to(siim_mini / "dicom-images-train")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest)
    return pos, neg


def test_bad_input_is_skipped_and_listed(siim_mini, tmp_path, tf):
    data = tmp_path / "data"
    pos, neg = _mini_copy(siim_mini, data, 5, 6)
    rows = [(i, v) for i, v in _csv_rows(siim_mini / "train-rle.csv") if i in pos + neg]
    train = data / "dicom-images-train"
    paths = {p.stem: p for p in train.rglob("*.dcm")}
    truncated, unlabelled, malformed, past_end = neg[0], neg[1], pos[0], pos[1]
    blob = paths[truncated].read_bytes()
    paths[truncated].write_bytes(blob[: len(blob) // 2])
    (train / "garbage.dcm").write_bytes(b"not a dicom" * 20)
    lines = ["ImageId, EncodedPixels"]
    for image_id, value in rows:
        if image_id == unlabelled:
            continue
        if image_id == malformed:
            value = "12 34 56"
        if image_id == past_end:
            value = "1048570 10"
        lines.append(f"{image_id}, {value}")
    lines.append("1.2.3.missing, -1")
    lines.append("garbage, -1")
    (data / "train-rle.csv").write_text("\n".join(lines) + "\n")
    line_of = {}
    for n, line in enumerate(lines, start=1):
        line_of.setdefault(line.split(",")[0], n)

    out = tmp_path / "cache"
    summary = prepare_cache(data, out, _cfg(size=64, folds=2), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = {Path(s["file"]).name + f":{s['row']}": s["reason"] for s in manifest["skipped"]}
    csv_name = "train-rle.csv"
    assert skipped == {
        f"{csv_name}:{line_of['1.2.3.missing']}":
            f"no DICOM for label row {line_of['1.2.3.missing']} (ImageId 1.2.3.missing)",
        f"{csv_name}:{line_of[malformed]}": "malformed RLE: odd number of values (3)",
        f"{unlabelled}.dcm:None": "no label row in train-rle.csv",
        f"garbage.dcm:{line_of['garbage']}": skipped[f"garbage.dcm:{line_of['garbage']}"],
        f"{truncated}.dcm:{line_of[truncated]}": skipped[f"{truncated}.dcm:{line_of[truncated]}"],
        f"{past_end}.dcm:{line_of[past_end]}": skipped[f"{past_end}.dcm:{line_of[past_end]}"],
    }
    assert skipped[f"garbage.dcm:{line_of['garbage']}"].startswith("not a DICOM file")
    assert skipped[f"{truncated}.dcm:{line_of[truncated]}"].startswith("truncated file")
    assert skipped[f"{past_end}.dcm:{line_of[past_end]}"].startswith(
        f"{data / csv_name} row {line_of[past_end]}: malformed relative RLE: run 1")
    assert "ends past" in skipped[f"{past_end}.dcm:{line_of[past_end]}"]
    # 11 copied: 4 of them skipped (truncated, unlabelled, malformed, past the end).
    assert manifest["counts"] == {"train": 7, "test": 0, "positive": 3, "negative": 4,
                                  "skipped": 6}
    assert "7 train images" in summary and "6 skipped" in summary
    assert set(_read_cache(out, "train")) == set(pos[2:] + neg[2:])


def test_resume_rebuilds_only_missing_shards_byte_identical(siim_mini, tmp_path, tf):
    out = tmp_path / "cache"
    cfg = _cfg(size=64, shard_size=8)
    prepare_cache(siim_mini, out, cfg, progress=False)
    shards = sorted(out.glob("*.tfrecord"))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards}
    index = (out / "index.csv").read_bytes()
    victim = shards[1]
    victim.unlink()  # as if killed while writing it: no shard, no sidecar, a stale .tmp
    records.sidecar_path(victim).unlink()
    (out / (victim.name + ".tmp")).write_bytes(b"half")

    summary = prepare_cache(siim_mini, out, cfg, progress=False)
    assert f"{len(shards)} shards (1 written, {len(shards) - 1} reused)" in summary
    assert not list(out.glob("*.tmp"))
    for p in sorted(out.glob("*.tfrecord")):
        assert p.read_bytes() == before[p.name][0]
        if p.name != victim.name:
            assert p.stat().st_mtime_ns == before[p.name][1]
    assert (out / "index.csv").read_bytes() == index

    with pytest.raises(PrepareError, match=r"was prepared with different settings \(size 64 != "
                                           r"128\); use a new --out or delete it"):
        prepare_cache(siim_mini, out, _cfg(size=128, shard_size=8), progress=False)
    # workers does not change the content: two spawn workers resume-check and give the
    # same bytes in a fresh folder (protobuf map order differs between processes otherwise).
    out2 = tmp_path / "cache2"
    prepare_cache(siim_mini, out2, _cfg(size=64, shard_size=8, workers=2), progress=False)
    assert {p.name: p.read_bytes() for p in out2.glob("*.tfrecord")} == {
        name: data for name, (data, _) in before.items()}


def test_input_errors(siim_mini, tmp_path):
    cfg = _cfg(size=64)
    with pytest.raises(PrepareError, match=r"nope: data folder not found$"):
        prepare_cache(tmp_path / "nope", tmp_path / "out", cfg)
    with pytest.raises(PrepareError, match="no dicom-images-train/ folder"):
        prepare_cache(tmp_path, tmp_path / "out", cfg)
    (tmp_path / "dicom-images-train").mkdir()
    with pytest.raises(LabelError, match="no label CSV found"):
        prepare_cache(tmp_path, tmp_path / "out", cfg)
    data = tmp_path / "few"
    pos, neg = _mini_copy(siim_mini, data, 1, 3)
    shutil.copy(siim_mini / "train-rle.csv", data / "train-rle.csv")
    with pytest.raises(FoldError, match="only 1 positive training image"):
        prepare_cache(data, tmp_path / "out", _cfg(size=64, folds=2))
    assert not (tmp_path / "out").exists()  # a failed plan leaves no half-made cache behind
    (data / "train-rle.csv").write_text("ImageId,EncodedPixels\nID_0011fe81e,-1\n")
    with pytest.raises(PrepareError, match=r"no usable training image: 4 DICOM\(s\) in "
                                           r"dicom-images-train, 1 labelled id\(s\) in .*, 5 "
                                           r"skipped; first: no DICOM for label row 2"):
        prepare_cache(data, tmp_path / "out", _cfg(size=64, folds=2))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("precious")
    with pytest.raises(PrepareError, match="not empty and is not a tfpneumo cache"):
        prepare_cache(siim_mini, tmp_path / "busy", cfg)


def test_cli_prepare(siim_mini, tmp_path, tf):
    from typer.testing import CliRunner

    from tfpneumo.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["prepare", "--data", str(siim_mini), "--out",
                                 str(tmp_path / "c"), "--size", "128", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "48 train images (15 positive, 33 negative) in 5 folds, 10 test images" in result.output
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["size"] == 128

    result = runner.invoke(app, ["prepare", "--data", str(tmp_path / "missing"), "--out",
                                 str(tmp_path / "d")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [f"error: {tmp_path / 'missing'}: data folder not found"]
    assert "Traceback" not in result.output


def _area_resize(a: np.ndarray, n: int) -> np.ndarray:
    """Independent exact area average to (n, n): each output pixel is the mean of the source
    area it covers, fractional pixels weighted by their overlap."""
    size = a.shape[0]
    scale = size / n
    lo = np.arange(n)[:, None] * scale
    j = np.arange(size)[None, :]
    weights = np.clip(np.minimum(lo + scale, j + 1) - np.maximum(lo, j), 0, None) / scale
    return weights @ a.astype(np.float64) @ weights.T


def test_synthetic_other_size_and_non_square(siim_mini, tmp_path, tf):
    """A square image of another size (96 px, synth) is resized by a non-integer factor; a
    non-square one is skipped."""
    import pydicom

    synth = pytest.importorskip("tfpneumo.data.synth")
    data = tmp_path / "syn"
    synth.synthesize(data, n_train=8, n_test=2, size=96, positive_rate=0.5, seed=0)
    ds = pydicom.dcmread(next((siim_mini / "dicom-images-train").rglob("*.dcm")))
    ds.set_pixel_data(np.zeros((64, 80), np.uint8), "MONOCHROME2", 8)
    ds.save_as(data / "dicom-images-train" / "wide.1.dcm")
    with open(data / "train-rle.csv", "a") as f:
        f.write("wide.1,-1\n")
    rows: dict[str, list[str]] = {}
    for image_id, value in _csv_rows(data / "train-rle.csv"):
        rows.setdefault(image_id, []).extend([] if value == "-1" else [value])

    out = tmp_path / "cache"
    prepare_cache(data, out, _cfg(size=64, folds=2), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(Path(s["file"]).name, s["reason"]) for s in manifest["skipped"]] == [
        ("wide.1.dcm", "image is 64x80; only square images are cached")]
    cache = _read_cache(out, "train")
    assert len(cache) == 8 and len(_read_cache(out, "test")) == 2
    paths = {p.stem: p for p in data.rglob("*.dcm")}
    for image_id, rec in cache.items():
        pixels = pydicom.dcmread(paths[image_id]).pixel_array
        assert np.abs(rec["image"] - _area_resize(pixels, 64)).max() <= 1
        cover = _area_resize(rle.decode_rows(rows[image_id], (96, 96)), 64)
        assert rec["has_mask"] == int(bool(rows[image_id])) == int(cover.max() >= 0.5)
        # Coverage exactly 0.5 (a float tie) is the only place the two may disagree.
        differ = rec["mask"] != (cover >= 0.5)
        assert np.all(np.abs(cover[differ] - 0.5) < 1e-6)
    # CLAHE is applied to the resized image, the mask is unchanged.
    import cv2

    prepare_cache(data, tmp_path / "clahe", _cfg(size=64, folds=2, clahe=True), progress=False)
    clahe = _read_cache(tmp_path / "clahe", "train")
    for image_id, rec in cache.items():
        expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(rec["image"])
        np.testing.assert_array_equal(clahe[image_id]["image"], expected)
        np.testing.assert_array_equal(clahe[image_id]["mask"], rec["mask"])


def test_duplicate_sop_instance_uids_are_cached_once_and_listed(tmp_path, tf):
    # Issue 11: the same image under two file names was cached twice (possibly in two folds).
    from tfpneumo.data.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, n_train=4, n_test=1, size=64, positive_rate=0.5, seed=4)  # 2 pos, 2 neg
    train_dir, test_dir = data / "dicom-images-train", data / "dicom-images-test"
    train = {p.stem: p for p in train_dir.rglob("*.dcm")}
    (test_file,) = test_dir.rglob("*.dcm")
    first, second = sorted(train)[:2]
    shutil.copy(train[first], train_dir / "copy-a.dcm")  # labelled under another name
    shutil.copy(train[second], test_dir / train[second].name)  # a train image among the test
    shutil.copy(test_file, test_dir / "copy-b.dcm")
    with open(data / "train-rle.csv", "a", encoding="utf-8") as f:
        f.write("copy-a, -1\n")
    out = tmp_path / "cache"
    summary = prepare_cache(data, out, _cfg(size=64, folds=2), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {Path(s["file"]).relative_to(data).as_posix(): s["reason"]
               for s in manifest["skipped"]}
    uid = "duplicate image: SOPInstanceUID {} is also {}, which is cached instead"
    assert reasons == {
        "dicom-images-train/copy-a.dcm": uid.format(first, train[first]),
        f"dicom-images-test/{second}.dcm": uid.format(second, train[second]),
        "dicom-images-test/copy-b.dcm": uid.format(test_file.stem, test_file),
    }
    assert manifest["counts"]["train"] == 4 and manifest["counts"]["test"] == 1, summary
    assert sorted(_read_cache(out, "train")) == sorted(train)
    assert list(_read_cache(out, "test")) == [test_file.stem]


def test_fifo_socket_folder_named_dcm_are_skipped_not_waited_on(tmp_path, tf):
    # Issue 11: a FIFO named x.dcm hung prepare forever (opening it waits for a writer).
    import os
    import socket
    import threading

    from tfpneumo.data.synth import synthesize

    data = tmp_path / "d"
    synthesize(data, n_train=4, n_test=1, size=64, positive_rate=0.5, seed=4)
    train_dir, test_dir = data / "dicom-images-train", data / "dicom-images-test"
    fifo = train_dir / "x.dcm"
    os.mkfifo(fifo)
    with open(data / "train-rle.csv", "a", encoding="utf-8") as f:
        f.write("x, -1\n")  # labelled: its header would be read
    (train_dir / "y.dcm").mkdir()
    (test_dir / "z.dcm").symlink_to(tmp_path / "gone.dcm")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(test_dir / "s.dcm"))
    out, result = tmp_path / "cache", {}

    def run() -> None:
        try:
            result["summary"] = prepare_cache(data, out, _cfg(size=64, folds=2), progress=False)
        except BaseException as e:  # reported below
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive():  # the regression: unblock the reader (EOF), then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=30)
        pytest.fail("prepare waited on a FIFO named x.dcm")
    sock.close()
    assert "error" not in result, result
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {Path(s["file"]).relative_to(data).as_posix(): s["reason"]
               for s in manifest["skipped"]}
    assert reasons == {
        "dicom-images-train/x.dcm": "not a regular file (a FIFO)",
        "dicom-images-train/y.dcm": "not a regular file (a folder)",
        "dicom-images-test/s.dcm": "not a regular file (a socket)",
        "dicom-images-test/z.dcm": "not a regular file (a broken symlink)",
        "train-rle.csv": "no DICOM for label row 6 (ImageId x)",
    }
    assert manifest["counts"]["train"] == 4 and manifest["counts"]["test"] == 1
