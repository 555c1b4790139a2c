"""Synthetic SIIM-ACR dataset: chest-radiograph-like DICOMs and RLE labels in the Kaggle layout.

``synthesize(out)`` writes::

    OUT/dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    OUT/dicom-images-test/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    OUT/train-rle.csv          header "ImageId, EncodedPixels", one row per annotation
    OUT/sample_submission.csv  header "ImageId,EncodedPixels", every test id with -1
    OUT/synth.json             the arguments it was written with (n_train, ..., look)

The DICOMs mirror the real ones: 8-bit MONOCHROME2, JPEG Baseline (1.2.840.10008.1.2.4.50)
encapsulated pixel data, Secondary Capture, CR, CHEST, PatientID/Age/Sex, ViewPosition.

Images are drawn procedurally (numpy + OpenCV, ~0.05 s per 1024 px image written): body
and shoulders, two lung fields, mediastinum, heart, spine, trachea, clavicles, posterior and
anterior ribs, diaphragm domes, and branching vascular markings from the hila. A pneumothorax
is the part of a lung between the chest wall and the collapsed lung: it has no vascular
markings, is darker, and is bounded on the lung side by a thin bright visceral pleural line.
Its mask is exactly that region. With ``masks_from`` the regions are real SIIM masks instead of
procedural shapes (the lungs are drawn where real lungs are, and stretched to hold the shape).

Every image has its own child seed, ``SeedSequence(seed, spawn_key=(split, index))``, so image
``i`` is the same whatever ``n_train`` / ``n_test`` are, and the same seed gives byte-identical
files (on one machine: JPEG and OpenCV builds may differ across platforms).

A ``look`` (:mod:`.looks`: ``standard``, ``faint``, ``noisy``, ``sharp``) changes how the
data looks: contrast and noise, body and lung geometry, how a pneumothorax shows. ``standard``
is the generator as it always was, byte for byte.

Layout: :mod:`.anatomy` (geometry), :mod:`.render` (pixels), :mod:`.looks` (the named looks),
this module (the dataset: DICOM and CSV writing, real mask shapes, :func:`synthesize`).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from tfpneumo.data import rle
from tfpneumo.data.synth.looks import LOOKS, Look
from tfpneumo.data.synth.render import _render
from tfpneumo.errors import TfpneumoError

# pydicom's own UID root (1.2.826.0.1.3680043.8.498): the real files use OFFIS's root, which is
# not ours to mint UIDs under. The suffix mirrors the real ".<kind>.<n>.<n>.<n>" pattern.
UID_ROOT = "1.2.826.0.1.3680043.8.498"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
TRAIN_DIR = "dicom-images-train"
TEST_DIR = "dicom-images-test"
LABELS_CSV = "train-rle.csv"
SUBMISSION_CSV = "sample_submission.csv"
ARGS_JSON = "synth.json"
# Real pixel spacings of the SIIM DICOMs (mm at 1024 px).
_SPACINGS = (0.139, 0.143, 0.168, 0.171, 0.194311)
_SPLITS = {"train": 1, "test": 2}


class SynthError(TfpneumoError):
    """Bad arguments to :func:`synthesize` or an unusable ``masks_from`` file."""


# --------------------------------------------------------------------------------------------
# Real mask shapes (masks_from)
# --------------------------------------------------------------------------------------------


def _load_real_masks(path: Path) -> list[tuple[str, list[str]]]:
    """Positive images of a SIIM label CSV (plain or gzip): sorted ``(ImageId, [rle, ...])``."""
    import csv

    if not path.is_file():
        raise SynthError(f"{path}: --masks-from file not found")
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    try:
        raw = gzip.open(path, "rb").read() if gz else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise SynthError(f"{path}: cannot read the label CSV ({err})") from None
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    if header[:2] != ["ImageId", "EncodedPixels"]:
        raise SynthError(f"{path}: expected a SIIM label CSV with header 'ImageId, "
                         f"EncodedPixels', got {','.join(header)[:60]!r}")
    by_id: dict[str, list[str]] = {}
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) < 2:
            raise SynthError(f"{path}: row {line} has {len(row)} column(s), expected 2")
        value = row[1].strip()
        if value and value != "-1":
            by_id.setdefault(row[0].strip(), []).append(value)
    if not by_id:
        raise SynthError(f"{path}: no positive (non -1) masks to sample shapes from")
    return sorted(by_id.items())


def _sample_real_rows(rng: np.random.Generator, real: list[tuple[str, list[str]]], size: int,
                      path: Path) -> list[np.ndarray]:
    """The annotation rows of one random real positive image, resized to ``(size, size)``."""
    for _ in range(50):
        image_id, rles = real[int(rng.integers(len(real)))]
        rows = []
        for rle_str in rles:
            try:
                m = rle.decode(rle_str, (1024, 1024), fmt="relative")
            except rle.RLEError as err:
                raise SynthError(f"{path}: ImageId {image_id}: {err}") from None
            if size != 1024:
                m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
            if m.any():
                rows.append(m)
        if rows:
            return rows
    raise SynthError(f"{path}: the sampled masks vanish at {size} px; use a larger --size")


# --------------------------------------------------------------------------------------------
# DICOM and CSV writing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Meta:
    study: str
    series: str
    sop: str
    patient_id: str
    sex: str
    age: int
    view: str
    spacing: float


def _uid(kind: int, seed: int, split: int, index: int) -> str:
    """``ROOT.<kind>.<seed>.<split><index:06d>``: unique per (kind, seed, split, index)."""
    return f"{UID_ROOT}.{kind}.{seed}.{split}{index:06d}"


def _encode_jpeg(image: np.ndarray) -> bytes:
    """``(H, W) uint8`` -> baseline grayscale JPEG bytes (quality 95)."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="JPEG", quality=95, optimize=False,
                                          progressive=False)
    return buf.getvalue()


def _write_dicom(path: Path, image: np.ndarray, meta: _Meta) -> None:
    """Write one 8-bit MONOCHROME2 JPEG-Baseline DICOM with the tags of the real SIIM files."""
    from pydicom import config as dcm_config
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    fm.MediaStorageSOPInstanceUID = meta.sop
    fm.TransferSyntaxUID = JPEG_BASELINE
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = meta.sop
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {meta.view}"
    ds.PatientName = meta.patient_id
    ds.PatientID = meta.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = meta.sex
    # The real files store the age as a bare number ("38"), not the AS form "038Y".
    ds.add(DataElement(0x00101010, "AS", str(meta.age), validation_mode=dcm_config.IGNORE))
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = meta.view
    ds.StudyInstanceUID = meta.study
    ds.SeriesInstanceUID = meta.series
    ds.StudyID = ""
    ds.SeriesNumber = "1"
    ds.InstanceNumber = "1"
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.PixelSpacing = [f"{meta.spacing:.6g}", f"{meta.spacing:.6g}"]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.add(DataElement(0x7FE00010, "OB", encapsulate([_encode_jpeg(image)])))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise SynthError(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise SynthError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _image_rng(seed: int, split: int, index: int) -> np.random.Generator:
    """Image ``index`` of ``split`` gets the same stream whatever the dataset size."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split, index)))


def _write_split(root: Path, split: str, n: int, *, size: int, positive_rate: float,
                 seed: int, real: list[tuple[str, list[str]]] | None,
                 masks_from: Path | None, look: Look) -> list[tuple[str, list[str]]]:
    """Render and write ``n`` DICOMs of ``split``; returns ``[(sop, [rle rows])]`` in order."""
    code = _SPLITS[split]
    folder = root / (TRAIN_DIR if split == "train" else TEST_DIR)
    folder.mkdir()
    labels = []
    patient: tuple[str, str, int] | None = None
    for i in range(n):
        rng = _image_rng(seed, code, i)
        positive = bool(rng.random() < positive_rate)
        # Patient identity: sometimes the previous image's patient (a follow-up film), so that
        # folds must be grouped by patient. All draws happen in every case to keep the stream.
        follow_up = rng.random() < 0.15
        new_patient = (str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                       "M" if rng.random() < 0.55 else "F", int(rng.integers(18, 90)))
        if patient is None or not follow_up:
            patient = new_patient
        view = "PA" if rng.random() < 0.6 else "AP"
        spacing = _SPACINGS[int(rng.integers(len(_SPACINGS)))] * 1024 / size
        real_rows = _sample_real_rows(rng, real, size, masks_from) if (
            positive and real is not None) else None
        rendered = _render(rng, size, positive, real_rows, look)
        meta = _Meta(study=_uid(2, seed, code, i), series=_uid(3, seed, code, i),
                     sop=_uid(4, seed, code, i), patient_id=patient[0], sex=patient[1],
                     age=patient[2], view=view, spacing=spacing)
        _write_dicom(folder / meta.study / meta.series / f"{meta.sop}.dcm", rendered.image, meta)
        labels.append((meta.sop, [rle.encode(m, fmt="relative") for m in rendered.rows]))
    return labels


def synthesize(out: Path, *, n_train: int = 200, n_test: int = 50, size: int = 1024,
               positive_rate: float = 0.22, seed: int = 0,
               masks_from: Path | None = None, look: str = "standard") -> str:
    """Write a synthetic dataset in the exact SIIM-ACR Kaggle layout into ``out``.

    Args:
        out: folder to create; it must not exist or be empty. The dataset is written into a
            sibling ``<out>.tmp-*`` folder and renamed at the end, so ``out`` is never half
            written.
        n_train: labelled training images (>= 1).
        n_test: unlabelled test images (>= 0); listed in ``sample_submission.csv``.
        size: image side in pixels (64..4096; SIIM is 1024).
        positive_rate: probability that an image has a pneumothorax, in (0, 1).
        seed: non-negative random seed; the same seed gives byte-identical files.
        masks_from: optional SIIM label CSV (``.csv`` or ``.csv.gz``) whose real positive mask
            shapes are used instead of procedural ones.
        look: name of a :data:`~tfpneumo.data.synth.looks.LOOKS` entry; ``"standard"`` is
            the generator as it always was.

    Returns:
        A one-line summary, e.g. ``"wrote 200 train (44 positive, 51 annotation rows) + 50 test
        DICOMs to data/synth"``.

    Raises:
        SynthError: bad arguments, an unknown look, an existing non-empty ``out``, an
            unusable ``masks_from``.
    """
    n_train = _check_int("n_train", n_train, 1, 1_000_000)
    n_test = _check_int("n_test", n_test, 0, 1_000_000)
    size = _check_int("size", size, 64, 4096)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    try:
        positive_rate = float(positive_rate)
    except (TypeError, ValueError):
        raise SynthError(f"positive_rate must be a number, got {positive_rate!r}") from None
    if not 0.0 < positive_rate < 1.0:
        raise SynthError(f"positive_rate must be in (0, 1), got {positive_rate}")
    if not isinstance(look, str) or look not in LOOKS:
        raise SynthError(f"unknown look {look!r}; known looks: {', '.join(LOOKS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise SynthError(f"{out}: folder exists and is not empty; refusing to overwrite it")
    real = None
    if masks_from is not None:
        masks_from = Path(masks_from)
        real = _load_real_masks(masks_from)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        common = dict(size=size, positive_rate=positive_rate, seed=seed, real=real,
                      masks_from=masks_from, look=LOOKS[look])
        train = _write_split(tmp, "train", n_train, **common)
        test = _write_split(tmp, "test", n_test, **common)
        # Same header, value and line formatting as the real train-rle.csv / sample
        # submission (no quoting, "-1" for an empty image, one row per annotation).
        lines = ["ImageId, EncodedPixels"]
        for sop, rows in train:
            lines.extend(f"{sop},{r}" for r in rows or ["-1"])
        (tmp / LABELS_CSV).write_text("\n".join(lines) + "\n", newline="\n")
        sub = ["ImageId,EncodedPixels"] + [f"{sop},-1" for sop, _ in test]
        (tmp / SUBMISSION_CSV).write_text("\n".join(sub) + "\n", newline="\n")
        # How the dataset was made, so that a folder of DICOMs can be told apart and remade;
        # prepare finds its DICOMs and label CSV by name and never reads this.
        args = {"n_train": n_train, "n_test": n_test, "size": size,
                "positive_rate": positive_rate, "seed": seed, "look": look,
                "masks_from": None if masks_from is None else str(masks_from)}
        (tmp / ARGS_JSON).write_text(json.dumps(args, indent=1) + "\n", newline="\n")
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename cannot replace a folder portably
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_pos = sum(1 for _, rows in train if rows)
    n_rows = sum(len(rows) for _, rows in train)
    return (f"wrote {n_train} train ({n_pos} positive, {n_rows} annotation rows) + "
            f"{n_test} test DICOMs to {out}")
