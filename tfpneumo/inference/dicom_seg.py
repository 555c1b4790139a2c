"""DICOM Segmentation objects of predict's output, written with highdicom: one per source image.

Each SEG holds one segment, "Pneumothorax" (segmented property category SCT 49755003
"Morphologically Abnormal Structure", type SCT 36118008 "Pneumothorax", algorithm type
AUTOMATIC, algorithm family DCM 123110 "Artificial Intelligence"), at the source image's
rows and columns, referencing the source by its Study/Series/SOP Instance UIDs. ``binary``:
the thresholded, gated mask (1 bit per pixel), exactly ``<id>_mask.png``; ``fractional``: the
mask probability (PROBABILITY, 8 bits, 255 = 1.0), exactly ``<id>_prob.png``'s grey levels,
before the rule (the rule is named in the algorithm parameters).

What sources do not always have, and what the SEG gets instead (the SIIM test files are the
case in point):

- Frame of Reference: a projection radiograph has no patient coordinate system, so none is
  invented. Without a FrameOfReferenceUID in the source, the SEG has none either and no plane
  position or orientation: it is tied to the source pixel for pixel through its Derivation
  Image Sequence (Spatial Locations Preserved YES), as the Segmentation IOD allows. A source
  FrameOfReferenceUID is copied.
- Pixel spacing: a SEG of an image without patient coordinates (no ImagePositionPatient: every
  projection radiograph) has no Pixel Measures. Its pixels are the source's pixels, so the
  spacing is the source's PixelSpacing (SIIM: 0.139 to 0.168 mm), read from the source. Why
  not copy it: there Pixel Measures would hold PixelSpacing without SliceThickness (a
  projection has none), which the standard allows but highdicom 0.28's reader refuses
  (``segread`` raises), and highdicom's design for such sources (its PR #183, discussed with
  D. Clunie) left Pixel Measures out. ImagerPixelSpacing is never used: it is measured at the
  detector, not in the patient (it differs by the geometric magnification).
- UIDs: a missing or invalid StudyInstanceUID or SeriesInstanceUID is replaced by a UID
  derived from the source's SOP Instance UID (every SEG of one image lands in the same
  study). An invalid SOPInstanceUID (SIIM stage-2 test files: ``ID_004d6fbb6``) is replaced by
  the file meta's MediaStorageSOPInstanceUID when that is a valid UID (Part 10 requires the
  two to be equal, and these files keep the original there), else by a UID derived from the
  file's bytes. Each replacement is reported (:attr:`SegSource.notes`).
- PatientAge: the AS form is ``062Y``; SIIM's ``62`` is rewritten as ``062Y``; an age that
  cannot be read is left out.

An empty mask still gives a SEG: one all-zero frame (highdicom would otherwise omit it and
have no frame to write), so "no pneumothorax found" is a stored result, not a missing file.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tfpneumo.data.dicom import MAX_DICOM_MIB, read_dataset_header
from tfpneumo.errors import TfpneumoError, first_line

SEG_TYPES = ("binary", "fractional")
SEGMENT_LABEL = "Pneumothorax"
SERIES_NUMBER = 99  # a new series per SEG; a number the source series is unlikely to use
MAX_FRACTIONAL = 255


def _codes():
    """(category, property type, algorithm family) from pydicom's code dictionary."""
    from pydicom.sr.codedict import codes

    return (codes.SCT.MorphologicallyAbnormalStructure,  # SCT 49755003
            codes.SCT.Pneumothorax,  # SCT 36118008
            codes.cid7162.ArtificialIntelligence)  # DCM 123110


def _valid_uid(value: Any) -> str | None:
    from pydicom.uid import UID

    text = str(value or "").strip()
    return text if text and UID(text).is_valid else None


def _derived_uid(*parts: str) -> str:
    """A valid UID that is a function of ``parts``: the same source gives the same UID."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["tfpneumo", *parts])


def _age_string(value: Any) -> str | None:
    """An AS value (``nnnD|W|M|Y``) from ``62``, ``062Y``, ``18 M``; None when unreadable."""
    text = str(value or "").strip().upper().replace(" ", "")
    unit = text[-1:] if text[-1:] in ("D", "W", "M", "Y") else "Y"
    digits = text[:-1] if text[-1:] in ("D", "W", "M", "Y") else text
    if not digits.isdigit() or int(digits) > 999:
        return None
    return f"{int(digits):03d}{unit}"


@dataclass
class SegSource:
    """A source image's header (no pixels), with the UIDs a SEG must reference made valid.

    ``notes``: one short text per value filled in (see the module docstring)."""

    path: Path
    dataset: Any  # pydicom Dataset
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.dataset.Rows), int(self.dataset.Columns)


def seg_source(path: str | Path, max_mib: float = MAX_DICOM_MIB) -> SegSource:
    """Reads the header of ``path`` and makes it referencable (see the module docstring).

    Raises :class:`TfpneumoError` naming the file when it cannot be the source of a SEG
    (no SOPClassUID, no image size, more than one frame or sample per pixel)."""
    import pydicom.config

    path = Path(path)
    ds = read_dataset_header(path, max_mib)
    # SIIM's "ID_..." UIDs make pydicom warn on every access; they are dealt with below.
    with pydicom.config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _referencable(path, ds)


def _referencable(path: Path, ds: Any) -> SegSource:
    notes: list[str] = []
    try:
        sop_class = _valid_uid(ds.get("SOPClassUID"))
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(str(ds.get("NumberOfFrames", 1) or 1).strip() or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except Exception as e:  # lazy parsing of a corrupt element
        raise TfpneumoError(f"{path}: corrupt DICOM header ({first_line(e)})") from e
    if sop_class is None:
        raise TfpneumoError(f"{path}: no valid SOPClassUID; a DICOM SEG cannot reference it")
    if rows <= 0 or cols <= 0:
        raise TfpneumoError(f"{path}: no Rows/Columns; a DICOM SEG needs the image size")
    if frames != 1 or samples != 1:
        raise TfpneumoError(f"{path}: {frames} frame(s) of {samples} sample(s) per pixel; "
                            "predict reads one grey frame")
    ds.SOPClassUID = sop_class

    sop = _valid_uid(ds.get("SOPInstanceUID"))
    if sop is None:
        meta_uid = _valid_uid(getattr(ds, "file_meta", {}).get("MediaStorageSOPInstanceUID"))
        if meta_uid is not None:
            sop = meta_uid
            notes.append(f"SOPInstanceUID {str(ds.get('SOPInstanceUID', ''))!r} is not a UID: "
                         "the file meta's is referenced")
        else:
            with open(path, "rb") as f:
                sop = _derived_uid("source", hashlib.file_digest(f, "sha256").hexdigest())
            notes.append("no valid SOPInstanceUID: one derived from the file is referenced")
        ds.SOPInstanceUID = sop
    derived = [k for k in ("StudyInstanceUID", "SeriesInstanceUID") if _valid_uid(ds.get(k)) is None]
    for keyword in derived:
        setattr(ds, keyword, _derived_uid(keyword, sop))
    if derived:
        notes.append(f"no valid {' or '.join(derived)}: derived from the SOP Instance UID")
    if "ImagePositionPatient" not in ds and "PixelSpacing" in ds:
        del ds.PixelSpacing  # no Pixel Measures without patient coordinates (module docstring)
    if "PatientAge" in ds:
        age = _age_string(ds.PatientAge)
        if age is None:
            del ds.PatientAge
        else:
            ds.PatientAge = age
    return SegSource(path, ds, notes)


@dataclass(frozen=True)
class Algorithm:
    """Who made the segment: ``version`` of tfpneumo and ``parameters`` (run, folds, weights,
    rule, size, TTA), stored in the segment's Algorithm Identification."""

    version: str
    parameters: Mapping[str, str]

    def __post_init__(self) -> None:
        # stored as "k=v,k=v" (highdicom's encoding, which it splits back on "," and "=")
        bad = [k for k, v in self.parameters.items() if {",", "="} & set(f"{k}{v}")]
        if bad:
            raise ValueError(f"algorithm parameter {bad[0]}: no ',' or '=' allowed")


def build_seg(source: SegSource, pixels: np.ndarray, algorithm: Algorithm,
              seg_type: str = "binary") -> Any:
    """The SEG (a highdicom ``Segmentation``, a pydicom Dataset) of one source image.

    pixels: (Rows, Columns) of the source; bool (or 0/1) for ``binary``, float probabilities
    in [0, 1] for ``fractional`` (stored as round(p * 255) / 255). New Series and SOP
    Instance UIDs each call."""
    import highdicom as hd

    if seg_type not in SEG_TYPES:
        raise TfpneumoError(f"--seg-type {seg_type!r}: expected one of {', '.join(SEG_TYPES)}")
    if pixels.shape != source.shape:
        raise TfpneumoError(f"{source.path}: mask {pixels.shape} is not the image size "
                            f"{source.shape}")
    category, prop, family = _codes()
    identification = hd.AlgorithmIdentificationSequence(
        name="tfpneumo", family=family, version=algorithm.version,
        parameters=dict(algorithm.parameters))
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL, segmented_property_category=category,
        segmented_property_type=prop, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=identification)
    if seg_type == "binary":
        array = np.asarray(pixels).astype(bool)
    else:
        array = np.clip(np.asarray(pixels, np.float32), 0.0, 1.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on the source's odd values
            seg = hd.seg.Segmentation(
                source_images=[source.dataset], pixel_array=array,
                segmentation_type=seg_type.upper(), segment_descriptions=[segment],
                series_instance_uid=hd.UID(), series_number=SERIES_NUMBER,
                sop_instance_uid=hd.UID(), instance_number=1, manufacturer="tfpneumo",
                manufacturer_model_name="tfpneumo", software_versions=algorithm.version,
                device_serial_number=algorithm.parameters.get("run", "tfpneumo"),
                fractional_type="PROBABILITY", max_fractional_value=MAX_FRACTIONAL,
                content_label="PNEUMOTHORAX",
                content_description="tfpneumo pneumothorax segmentation",
                omit_empty_frames=False)  # an empty mask is a result: keep its frame
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise TfpneumoError(f"{source.path}: cannot make a DICOM SEG of it "
                            f"({first_line(e)})") from e
    seg.SeriesDescription = f"tfpneumo {SEGMENT_LABEL} ({seg_type})"
    # General Image: PatientOrientation is type 2C, required without a plane orientation (a
    # source without patient coordinates); highdicom leaves it out, so the source's (maybe
    # empty) value goes in.
    if "PlaneOrientationSequence" not in seg.SharedFunctionalGroupsSequence[0]:
        seg.PatientOrientation = source.dataset.get("PatientOrientation", "")
    return seg


def seg_bytes(seg: Any) -> bytes:
    """The SEG as a DICOM Part 10 file (preamble, file meta), in memory."""
    import io

    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
