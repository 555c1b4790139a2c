"""Finding and reading SIIM DICOMs: 8-bit pixels and the few header fields we keep.

SIIM images are 1024x1024, 8-bit MONOCHROME2, JPEG-Baseline compressed; pydicom decodes them
with pillow. Other inputs are handled too: MONOCHROME1 is inverted, 16-bit data is windowed
to its own min/max. Every failure is a :class:`DicomError` naming the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from tfpneumo.data.labels import check_id
from tfpneumo.errors import TfpneumoError, first_line

META_KEYS = ("patient_id", "patient_age", "patient_sex", "view_position", "sop_instance_uid")


class DicomError(TfpneumoError):
    """A DICOM file or folder cannot be used (not DICOM, truncated, no pixels, ...)."""


def find_dicoms(root: str | Path, bad: list[tuple[Path, str]] | None = None) -> dict[str, Path]:
    """Image id (file stem, the SOPInstanceUID) -> path for every ``*.dcm`` below ``root``.

    Any depth is searched (train: ``<study>/<series>/<sop>.dcm``, test: flat). Two files with
    the same stem raise, naming both. A stem that could act as a path (``..``, ``\\``, NUL)
    raises too, or is appended to ``bad`` as ``(path, reason)`` when ``bad`` is given.
    """
    root = Path(root)
    if not root.is_dir():
        raise DicomError(f"{root}: DICOM folder not found")
    found: dict[str, Path] = {}

    def fail(e: OSError) -> None:
        raise DicomError(f"{e.filename or root}: cannot read folder ({e.strerror or e})")

    for folder, dirs, files in os.walk(root, onerror=fail):
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(".dcm"):
                continue
            path = Path(folder) / name
            image_id = name[: -len(".dcm")]
            reason = check_id(image_id)
            if reason is not None:
                if bad is None:
                    raise DicomError(f"{path}: {reason}")
                bad.append((path, reason))
                continue
            if image_id in found:
                raise DicomError(f"image id {image_id} appears twice: {found[image_id]} and {path}")
            found[image_id] = path
    return found


def _age(value: Any) -> int | None:
    """PatientAge ("062Y", "62", "18M") in whole years, or None when absent or invalid."""
    text = str(value or "").strip().upper()
    unit = text[-1:] if text[-1:] in ("Y", "M", "W", "D") else "Y"
    digits = text.rstrip("YMWD").strip()
    if not digits.isdigit():
        return None
    return int(digits) // {"Y": 1, "M": 12, "W": 52, "D": 365}[unit]


def _meta(ds: Any) -> dict:
    return {
        "patient_id": str(ds.get("PatientID", "") or ""),
        "patient_age": _age(ds.get("PatientAge")),
        "patient_sex": str(ds.get("PatientSex", "") or ""),
        "view_position": str(ds.get("ViewPosition", "") or ""),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "") or ""),
    }


def _header(path: Path, ds: Any) -> dict:
    """:func:`_meta` with errors turned into :class:`DicomError`: pydicom converts element
    values lazily, on first access, so a corrupt header element (an unknown VR, a bad
    length) only raises here, as NotImplementedError, ValueError, ..."""
    try:
        return _meta(ds)
    except Exception as e:
        raise DicomError(f"{path}: corrupt DICOM header ({first_line(e)})") from e


def _read(path: Path, stop_before_pixels: bool) -> tuple[Any, list[str]]:
    """``pydicom.dcmread`` with errors turned into :class:`DicomError`; also returns the
    warnings pydicom emitted (a truncated file only gives a warning and a dataset without
    its last elements)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError as e:
            raise DicomError(f"{path}: not a DICOM file ({first_line(e)})") from e
        except FileNotFoundError as e:
            raise DicomError(f"{path}: file not found") from e
        except (EOFError, OSError) as e:
            raise DicomError(f"{path}: truncated or unreadable DICOM ({first_line(e)})") from e
        except Exception as e:  # pydicom raises assorted errors on corrupt element streams
            raise DicomError(f"{path}: corrupt DICOM ({first_line(e)})") from e
    return ds, [str(w.message).splitlines()[0] for w in caught]


def read_header(path: str | Path) -> dict:
    """Metadata of a DICOM without decoding its pixels (cheap: ~1 ms).

    Returns :data:`META_KEYS` plus ``height`` and ``width`` (Rows, Columns; 0 when absent).
    """
    import pydicom.config

    path = Path(path)
    # Stage-2 test files use "ID_..." as SOPInstanceUID, which pydicom warns about.
    with pydicom.config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds, _ = _read(path, stop_before_pixels=True)
        meta = _header(path, ds)
        try:
            meta["height"], meta["width"] = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        except Exception as e:  # also the lazy parsing errors of a corrupt element
            raise DicomError(f"{path}: invalid Rows/Columns ({first_line(e)})") from e
    return meta


def to_uint8(pixels: np.ndarray, monochrome1: bool = False) -> np.ndarray:
    """(H, W) pixels of any integer/float dtype -> (H, W) uint8.

    uint8 is kept as is; anything else is windowed linearly to its own min..max (a constant
    image becomes 0). MONOCHROME1 (white = low values) is inverted so that bone is bright.
    """
    if pixels.dtype != np.uint8:
        lo, hi = float(pixels.min()), float(pixels.max())
        scaled = (pixels.astype(np.float64) - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
        pixels = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if monochrome1:
        pixels = 255 - pixels
    return np.ascontiguousarray(pixels)


def read_dicom(path: str | Path) -> tuple[np.ndarray, dict]:
    """Decodes one DICOM: ``(H, W) uint8`` pixels and its metadata (see :data:`META_KEYS`).

    Raises :class:`DicomError` naming the file when it is not a DICOM, truncated or corrupt,
    has no pixel data, or is not a single 2-D grayscale frame.
    """
    import pydicom.config

    path = Path(path)
    with pydicom.config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds, problems = _read(path, stop_before_pixels=False)
        if "PixelData" not in ds:
            truncated = [w for w in problems if "end of file" in w.lower()]
            raise DicomError(f"{path}: truncated file, pixel data incomplete ({truncated[0]})"
                             if truncated else f"{path}: no pixel data")
        try:
            pixels = ds.pixel_array
        except Exception as e:  # decoders (pillow, numpy) raise many types on corrupt data
            raise DicomError(f"{path}: cannot decode pixel data ({first_line(e)})") from e
        meta = _header(path, ds)
        try:
            photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
        except Exception as e:  # lazy parsing of a corrupt element, see _header
            raise DicomError(f"{path}: corrupt DICOM header ({first_line(e)})") from e
    if pixels.ndim != 2:
        raise DicomError(f"{path}: expected one 2-D grayscale frame, got pixel array of shape "
                         f"{pixels.shape} ({photometric})")
    if pixels.size == 0:
        raise DicomError(f"{path}: empty pixel array")
    return to_uint8(pixels, photometric == "MONOCHROME1"), meta
