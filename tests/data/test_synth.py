"""Tests of the synthetic SIIM-layout dataset generator (tfpneumo.data.synth)."""

from __future__ import annotations

import csv
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tfpneumo import TfpneumoError
from tfpneumo.data import rle, synth
from tfpneumo.data.synth import SynthError, synthesize

pydicom = pytest.importorskip("pydicom")

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
N_TRAIN, N_TEST, SIZE = 12, 3, 128


def _read(path: Path):
    with warnings.catch_warnings():
        # PatientAge is stored like the real files ("38", not "038Y"); pydicom warns.
        warnings.simplefilter("ignore", UserWarning)
        ds = pydicom.dcmread(path)
        _ = ds.PatientAge
    return ds


def _labels(root: Path) -> tuple[list[str], dict[str, list[str]]]:
    """(header, {ImageId: [EncodedPixels rows]}) of a train-rle.csv, in file order."""
    with open(root / "train-rle.csv", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows: dict[str, list[str]] = {}
        for image_id, value in reader:
            rows.setdefault(image_id, []).append(value)
    return header, rows


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = synthesize(out, n_train=N_TRAIN, n_test=N_TEST, size=SIZE, positive_rate=0.5,
                         seed=3)
    assert summary.startswith(f"wrote {N_TRAIN} train (") and summary.endswith(f"to {out}")
    return out


@pytest.fixture(scope="module")
def larger(tmp_path_factory) -> Path:
    """60 tiny images: enough for rates and multi-row annotations."""
    out = tmp_path_factory.mktemp("synth60") / "data"
    synthesize(out, n_train=60, n_test=1, size=64, positive_rate=0.3, seed=11)
    return out


def test_layout_is_siim(small: Path):
    train = sorted((small / "dicom-images-train").rglob("*.dcm"))
    test = sorted((small / "dicom-images-test").rglob("*.dcm"))
    assert len(train) == N_TRAIN and len(test) == N_TEST
    for path in train + test:
        # <root>/<study>/<series>/<sop>.dcm
        assert len(path.relative_to(small).parts) == 4
    assert sorted(p.name for p in small.iterdir()) == [
        "dicom-images-test", "dicom-images-train", "sample_submission.csv", "synth.json",
        "train-rle.csv"]
    assert json.loads((small / "synth.json").read_text()) == {
        "n_train": N_TRAIN, "n_test": N_TEST, "size": SIZE, "positive_rate": 0.5, "seed": 3,
        "look": "standard", "masks_from": None}
    # Written in a temporary sibling and renamed: nothing else is left next to it.
    assert [p.name for p in small.parent.iterdir()] == ["data"]


def test_csv_format(small: Path):
    raw = (small / "train-rle.csv").read_bytes()
    assert raw.startswith(b"ImageId, EncodedPixels\n")
    assert b"\r" not in raw and b'"' not in raw
    header, rows = _labels(small)
    sops = {p.stem for p in (small / "dicom-images-train").rglob("*.dcm")}
    assert set(rows) == sops
    for values in rows.values():
        if values == ["-1"]:
            continue
        for v in values:
            assert v != "-1" and v == v.strip()
            assert rle.decode(v, (SIZE, SIZE)).any()
    sub = (small / "sample_submission.csv").read_text().splitlines()
    assert sub[0] == "ImageId,EncodedPixels"
    assert {line.split(",")[0] for line in sub[1:]} == {
        p.stem for p in (small / "dicom-images-test").rglob("*.dcm")}
    assert all(line.endswith(",-1") for line in sub[1:])


def test_csv_headers_match_real(small: Path, siim_mini: Path):
    for name in ("train-rle.csv", "sample_submission.csv"):
        real_first = (siim_mini / name).read_bytes().split(b"\n", 1)[0]
        ours_first = (small / name).read_bytes().split(b"\n", 1)[0]
        assert ours_first == real_first
    # Negative rows are formatted like the real ones.
    real_values = {line.split(b",")[1] for line in
                   (siim_mini / "train-rle.csv").read_bytes().splitlines()[1:]}
    assert b"-1" in real_values
    ours = (small / "train-rle.csv").read_bytes().splitlines()[1:]
    assert any(line.endswith(b",-1") for line in ours)


def test_dicom_tags_and_pixels(small: Path):
    for path in sorted(small.rglob("*.dcm")):
        ds = _read(path)
        assert ds.file_meta.TransferSyntaxUID == JPEG_BASELINE
        assert ds.SOPClassUID == SECONDARY_CAPTURE
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert path.stem == ds.SOPInstanceUID
        assert path.parent.name == ds.SeriesInstanceUID
        assert path.parent.parent.name == ds.StudyInstanceUID
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
            assert pydicom.uid.UID(uid).is_valid, uid
        assert ds.Modality == "CR" and ds.BodyPartExamined == "CHEST"
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (8, 8, 7)
        assert (ds.SamplesPerPixel, ds.PixelRepresentation) == (1, 0)
        assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
        assert ds.PatientSex in ("M", "F")
        assert ds.PatientAge.isdigit() and 18 <= int(ds.PatientAge) < 90
        assert ds.ViewPosition in ("PA", "AP")
        assert ds.SeriesDescription == f"view: {ds.ViewPosition}"
        assert ds.PatientID and ds.PatientName == ds.PatientID
        # Encapsulated baseline JPEG (SOF0 marker) that pydicom + pillow decode.
        assert ds["PixelData"].is_undefined_length
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        assert frame[:2] == b"\xff\xd8" and b"\xff\xc0" in frame
        pixels = ds.pixel_array
        assert pixels.shape == (SIZE, SIZE) and pixels.dtype == np.uint8
        assert 20 < pixels.mean() < 235 and pixels.std() > 20


def test_tags_cover_the_real_ones(small: Path, siim_mini: Path):
    real = _read(next((siim_mini / "dicom-images-train").rglob("*.dcm")))
    ours = _read(next((small / "dicom-images-train").rglob("*.dcm")))
    real_tags = {e.keyword for e in real} | {e.keyword for e in real.file_meta}
    our_tags = {e.keyword for e in ours} | {e.keyword for e in ours.file_meta}
    # Every tag of the real file is present (values differ: UIDs, implementation name).
    assert real_tags - our_tags == set()
    for kw in ("SpecificCharacterSet", "StudyDate", "ConversionType", "LossyImageCompression",
               "LossyImageCompressionMethod", "SeriesNumber", "InstanceNumber"):
        assert ours[kw].value == real[kw].value, kw


def test_positive_rate_and_multi_row(larger: Path):
    _, rows = _labels(larger)
    positives = [v for v in rows.values() if v != ["-1"]]
    # Binomial(60, 0.3): mean 18, sd 3.5; this seed is fixed, the bounds are +-4 sd.
    assert 4 <= len(positives) <= 32
    assert any(len(v) >= 2 for v in positives)
    patients = [_read(p).PatientID for p in (larger / "dicom-images-train").rglob("*.dcm")]
    assert len(set(patients)) < len(patients)  # some patients have several films


def test_masks_inside_lungs_and_darker():
    """Masks lie in the lung field, and the image is darker inside them than around them."""
    darker = []
    for i in range(8):
        r = synth._render(synth._image_rng(5, 1, i), 256, True, None)
        assert r.rows and all(m.dtype == np.uint8 and m.any() for m in r.rows)
        mask = np.logical_or.reduce([m.astype(bool) for m in r.rows])
        assert 0.002 < mask.mean() < 0.2
        lung = r.lung_field > 0
        assert lung[mask].mean() > 0.97
        # Adjacent lung: a 7-pixel band around the mask, inside the lung.
        grown = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(
            ImageFilter.MaxFilter(15))) > 0
        ring = grown & ~mask & lung
        img = r.image.astype(np.float64)
        darker.append(img[ring].mean() - img[mask].mean())
    # Small apical regions under a clavicle can be on par with their surroundings.
    assert np.mean(np.array(darker) > 0) >= 0.75 and np.mean(darker) > 10


def test_negatives_have_no_rows():
    r = synth._render(synth._image_rng(5, 1, 0), 128, False, None)
    assert r.rows == [] and r.image.shape == (128, 128) and r.image.dtype == np.uint8


def test_brightness_threshold_does_not_solve_it():
    """The best single intensity threshold (either polarity) gives a poor pooled Dice."""
    images, masks = [], []
    for i in range(10):
        r = synth._render(synth._image_rng(9, 1, i), 256, True, None)
        images.append(r.image)
        masks.append(np.logical_or.reduce([m.astype(bool) for m in r.rows]))
    img, gt = np.stack(images).astype(np.int16), np.stack(masks)
    best = 0.0
    for t in range(256):
        for pred in (img < t, img >= t):
            best = max(best, 2 * (pred & gt).sum() / (pred.sum() + gt.sum()))
    assert best < 0.3


def test_same_seed_same_bytes_and_prefix_stable(tmp_path: Path):
    kw = dict(n_test=2, size=64, positive_rate=0.5)
    synthesize(tmp_path / "a", n_train=5, seed=4, **kw)
    synthesize(tmp_path / "b", n_train=5, seed=4, **kw)
    synthesize(tmp_path / "c", n_train=5, seed=5, **kw)
    synthesize(tmp_path / "d", n_train=3, seed=4, **kw)
    a, b, c, d = (_hashes(tmp_path / x) for x in "abcd")
    assert a == b and len(a) == 5 + 2 + 2 + 1  # DICOMs, CSVs, synth.json
    dicoms = [k for k in a if k.endswith(".dcm")]
    assert not set(a.values()) & set(c.values())
    # Image i does not depend on n_train.
    assert {k: d[k] for k in d if k.endswith(".dcm")} == {
        k: a[k] for k in dicoms if k in d}
    assert sum(k.endswith(".dcm") for k in d) == 3 + 2


def test_masks_from_uses_real_shapes(tmp_path: Path, siim_mini: Path):
    labels = siim_mini / "train-rle.csv"
    size = 256
    real: dict[str, list[np.ndarray]] = {}
    for image_id, rles in synth._load_real_masks(labels):
        # Independent resize: PIL nearest on each decoded 1024 mask.
        real[image_id] = [np.asarray(Image.fromarray(rle.decode(v) * 255).resize(
            (size, size), Image.NEAREST)) > 0 for v in rles]
    out = tmp_path / "data"
    synthesize(out, n_train=8, n_test=0, size=size, positive_rate=0.6, seed=2,
               masks_from=labels)
    _, rows = _labels(out)
    positives = [v for v in rows.values() if v != ["-1"]]
    assert positives
    for values in positives:
        ours = [rle.decode(v, (size, size)).astype(bool) for v in values]
        assert any(len(shapes) == len(ours) and all(
            (s == o).all() for s, o in zip(shapes, ours, strict=True))
            for shapes in real.values() if len(shapes) == len(ours)), "not a real shape"


def test_masks_from_gzip_stage2(siim_dir: Path):
    real = synth._load_real_masks(siim_dir / "stage_2_train.csv.gz")
    assert len(real) > 2000 and all(rles for _, rles in real)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_train=0), "n_train"),
    (dict(n_test=-1), "n_test"),
    (dict(size=32), "size"),
    (dict(size=100.5), "size"),
    (dict(positive_rate=0.0), "positive_rate"),
    (dict(positive_rate=1.0), "positive_rate"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments(tmp_path: Path, kwargs, match):
    with pytest.raises(SynthError, match=match) as info:
        synthesize(tmp_path / "out", **{"n_train": 2, "n_test": 0, "size": 64, **kwargs})
    assert "\n" not in str(info.value)
    assert isinstance(info.value, TfpneumoError)
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_out_but_accepts_empty(tmp_path: Path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(SynthError, match="not empty"):
        synthesize(tmp_path / "full", n_train=1, n_test=0, size=64)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(SynthError, match="not a folder"):
        synthesize(tmp_path / "file", n_train=1, n_test=0, size=64)
    (tmp_path / "empty").mkdir()
    synthesize(tmp_path / "empty", n_train=1, n_test=0, size=64)
    assert (tmp_path / "empty" / "train-rle.csv").exists()


def test_bad_masks_from(tmp_path: Path):
    with pytest.raises(SynthError, match="not found"):
        synthesize(tmp_path / "o", n_train=1, size=64, masks_from=tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,mask\n1.2.3,-1\n")
    with pytest.raises(SynthError, match="header"):
        synthesize(tmp_path / "o", n_train=1, size=64, masks_from=bad)
    empty = tmp_path / "neg.csv"
    empty.write_text("ImageId, EncodedPixels\n1.2.3,-1\n")
    with pytest.raises(SynthError, match="no positive"):
        synthesize(tmp_path / "o", n_train=1, size=64, masks_from=empty)
    broken = tmp_path / "broken.csv"
    broken.write_text("ImageId, EncodedPixels\n1.2.3, 5 2 7\n")
    with pytest.raises(SynthError, match="1.2.3"):
        synthesize(tmp_path / "o", n_train=4, size=64, positive_rate=0.9, masks_from=broken)
    assert not (tmp_path / "o").exists()


def test_failure_leaves_nothing(tmp_path: Path, monkeypatch):
    calls = []
    real_write = synth._write_dicom

    def failing(path, image, meta):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(path, image, meta)

    monkeypatch.setattr(synth, "_write_dicom", failing)
    with pytest.raises(OSError, match="disk full"):
        synthesize(tmp_path / "out", n_train=5, n_test=0, size=64)
    assert list(tmp_path.iterdir()) == []


# Pinned before looks existed (commit 6a3a166): the default look must keep today's images byte
# for byte. Hashes of the rendered pixels, and of the DICOMs and CSVs of a tiny dataset (JPEG
# and OpenCV builds may differ across platforms; these were taken on the project's Linux venv).
PINNED_PIXELS = {
    0: "9ee0c1acd26e8f39cd4223aa453fb477ec53c9ffd97700543a5dc14b0fc851a0",
    1: "cce8544b4ef6d3fecec21dc98804b20c5f3e4f03739811a0c9dd05b48de474f7",
    2: "94439d41f1e11593cdade633ac42414977fc25ffca62e7713485dc9d199a5e0f",
    3: "0970b3a171fdc953902fd7218592f6aadc53eb3eb4e1a8e761d6cfc849cb82bd",
}
PINNED_FILES = {
    "train-rle.csv": "da4592778e7c40f38019dc8f8fe4f383ed7d9794bee5dd0a8b1defc3609ca97f",
    "sample_submission.csv": "fcb2f28ad0a69fc5b76cd68409b09e83ecd17c5df074b43b6ec7f78b1d7528aa",
    "1.2.826.0.1.3680043.8.498.4.4.1000000.dcm":
        "541b451dd1ca880835d314b93f8e6f98ab2caa3342473884807f0ffa5799a910",
    "1.2.826.0.1.3680043.8.498.4.4.1000001.dcm":
        "7a74fb29a0bae9341ce143a1bcd7207275376c01d0d50973185455819004c2f8",
    "1.2.826.0.1.3680043.8.498.4.4.1000002.dcm":
        "2d6fc00dc2134266877b14f9ac6e8ab4f8f095b833a19c93ab6035abb3378e9e",
    "1.2.826.0.1.3680043.8.498.4.4.1000003.dcm":
        "44bf2b8b071735df688159bd6b56dd35b94d0e650d891d4a366c3c30e9e3335c",
    "1.2.826.0.1.3680043.8.498.4.4.2000000.dcm":
        "5622239d471825cdc3cb640c628f05225c65642a0d99b25b6d17efec15ee731a",
}


def test_default_output_is_pinned(tmp_path: Path):
    for i, digest in PINNED_PIXELS.items():
        r = synth._render(synth._image_rng(5, 1, i), 128, i % 2 == 0, None)
        assert hashlib.sha256(r.image.tobytes()).hexdigest() == digest, i
    synthesize(tmp_path / "d", n_train=4, n_test=1, size=64, positive_rate=0.5, seed=4)
    # By name, so that files added next to the dataset (not DICOM or CSV) are not pinned.
    got = {Path(k).name: v for k, v in _hashes(tmp_path / "d").items()
           if k.endswith((".dcm", ".csv"))}
    assert got == PINNED_FILES


# --------------------------------------------------------------------------------------------
# Looks
# --------------------------------------------------------------------------------------------

LOOK_NAMES = ("standard", "faint", "noisy", "sharp")


def _ring_contrast(image: np.ndarray, mask: np.ndarray, lung: np.ndarray) -> float:
    """Mean of the adjacent lung (a 7-pixel band around ``mask``) minus the mask's mean."""
    grown = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(
        ImageFilter.MaxFilter(15))) > 0
    ring = grown & ~mask & lung
    img = image.astype(np.float64)
    return float(img[ring].mean() - img[mask].mean())


def _high_freq(image: np.ndarray) -> float:
    """Std of the image minus its Gaussian blur (radius 1, PIL): noise and fine edges."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1)), np.float64)
    return float((image.astype(np.float64) - blurred).std())


def _extent(a: np.ndarray, axis: int) -> int:
    """Rows (axis=1) or columns (axis=0) of ``a`` with any true pixel."""
    return int(a.any(axis=axis).sum())


@pytest.fixture(scope="module")
def by_look() -> dict[str, list]:
    """Six positive 256 px images per look, the same seeds (so the same patients) in each."""
    from tfpneumo.data.synth.looks import LOOKS

    return {name: [synth._render(synth._image_rng(5, 1, i), 256, True, None, LOOKS[name])
                   for i in range(6)] for name in LOOK_NAMES}


def _measure(rendered) -> dict[str, float]:
    std, contrast, hf, width, height, body = [], [], [], [], [], []
    for r in rendered:
        mask = np.logical_or.reduce([m.astype(bool) for m in r.rows])
        lung = r.lung_field > 0
        std.append(r.image.std())
        contrast.append(_ring_contrast(r.image, mask, lung))
        hf.append(_high_freq(r.image))
        width.append(_extent(lung, 0))
        height.append(_extent(lung, 1))
        # Bright (dense) pixels in the bottom row: the body's width where nothing covers it.
        body.append(float((r.image[-1] > 100).mean()))
    return {k: float(np.mean(v)) for k, v in dict(std=std, contrast=contrast, hf=hf,
                                                   width=width, height=height,
                                                   body=body).items()}


def test_looks_are_known_everywhere():
    from tfpneumo import cli
    from tfpneumo.data.synth.looks import LOOKS, Look

    assert tuple(LOOKS) == LOOK_NAMES == cli.SYNTH_LOOKS
    assert LOOKS["standard"] == Look()
    # Each other look changes more than one thing.
    for name in LOOK_NAMES[1:]:
        changed = [k for k, v in vars(LOOKS[name]).items() if v != getattr(Look(), k)]
        assert len(changed) >= 3, (name, changed)


def test_looks_differ_as_designed(by_look):
    m = {name: _measure(rendered) for name, rendered in by_look.items()}
    std, faint, noisy, sharp = (m[n] for n in LOOK_NAMES)
    # faint changes only how the image looks: same seed, same pneumothorax masks.
    for r_std, r_faint in zip(by_look["standard"], by_look["faint"], strict=True):
        assert len(r_std.rows) == len(r_faint.rows)
        assert all((a == b).all() for a, b in zip(r_std.rows, r_faint.rows, strict=True))
    # faint: lower contrast overall and between the pneumothorax and the lung around it.
    assert faint["std"] < 0.8 * std["std"]
    assert faint["contrast"] < 0.75 * std["contrast"]
    # noisy: much more high-frequency energy (grain), wider and shorter lungs, a bigger body.
    assert noisy["hf"] > 1.5 * std["hf"]
    assert noisy["width"] > std["width"] and noisy["height"] < std["height"]
    assert noisy["body"] > std["body"]
    # sharp: higher contrast everywhere, crisper edges, narrower and taller lungs, thinner body.
    assert sharp["std"] > 1.1 * std["std"] and sharp["contrast"] > 1.3 * std["contrast"]
    assert sharp["hf"] > 1.3 * std["hf"]
    assert sharp["width"] < std["width"] and sharp["height"] > std["height"]
    assert sharp["body"] < std["body"]


@pytest.mark.parametrize("name", LOOK_NAMES)
def test_every_look_stays_learnable(by_look, name):
    """In every look the mask is in the lung and darker than the lung around it."""
    darker = []
    for r in by_look[name]:
        mask = np.logical_or.reduce([m.astype(bool) for m in r.rows])
        lung = r.lung_field > 0
        assert 0.002 < mask.mean() < 0.2 and lung[mask].mean() > 0.97
        darker.append(_ring_contrast(r.image, mask, lung))
    assert np.mean(np.array(darker) > 3) >= 0.8 and np.mean(darker) > 8, darker


@pytest.mark.parametrize("name", LOOK_NAMES[1:])
def test_look_same_seed_same_bytes(tmp_path: Path, name):
    kw = dict(n_train=3, n_test=1, size=64, positive_rate=0.5, seed=4, look=name)
    synthesize(tmp_path / "a", **kw)
    synthesize(tmp_path / "b", **kw)
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert a == b and len(a) == 3 + 1 + 3
    # Not the standard images: the look changed the pixels.
    dicoms = {Path(k).name: v for k, v in a.items() if k.endswith(".dcm")}
    assert not set(dicoms.values()) & set(PINNED_FILES.values())
    assert json.loads((tmp_path / "a" / "synth.json").read_text())["look"] == name


@pytest.mark.parametrize("name", LOOK_NAMES)
def test_masks_from_with_every_look(siim_mini: Path, name):
    from tfpneumo.data.synth.looks import LOOKS

    labels = siim_mini / "train-rle.csv"
    real = synth._load_real_masks(labels)
    darker = []
    for i in range(4):
        rng = synth._image_rng(2, 1, i)
        rows = synth._sample_real_rows(rng, real, 256, labels)
        r = synth._render(rng, 256, True, rows, LOOKS[name])
        assert len(r.rows) == len(rows) and all((a == b).all() for a, b in zip(
            r.rows, rows, strict=True))  # the real shapes, untouched
        mask = np.logical_or.reduce([m.astype(bool) for m in r.rows])
        lung = r.lung_field > 0
        assert lung[mask].mean() > 0.97
        darker.append(_ring_contrast(r.image, mask, lung))
    assert np.mean(darker) > 5, darker


def test_unknown_look(tmp_path: Path):
    with pytest.raises(SynthError, match=r"unknown look 'glossy'; known looks: standard, "
                                         r"faint, noisy, sharp$") as info:
        synthesize(tmp_path / "out", n_train=1, n_test=0, size=64, look="glossy")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_cli_synth_look(tmp_path: Path, siim_mini: Path):
    from typer.testing import CliRunner

    from tfpneumo.cli import app

    runner = CliRunner()
    labels = siim_mini / "train-rle.csv"
    result = runner.invoke(app, ["synth", str(tmp_path / "d"), "--n-train", "3", "--n-test",
                                 "1", "--size", "128", "--seed", "2", "--look", "faint",
                                 "--masks-from", str(labels)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "d" / "synth.json").read_text()) == {
        "n_train": 3, "n_test": 1, "size": 128, "positive_rate": 0.22, "seed": 2,
        "look": "faint", "masks_from": str(labels)}
    result = runner.invoke(app, ["synth", str(tmp_path / "e"), "--look", "glossy"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: unknown look 'glossy'; known looks: standard, faint, noisy, sharp"]
