"""Finding and reading SIIM DICOMs: 8-bit pixels and the few header fields we keep.

SIIM images are 1024x1024, 8-bit MONOCHROME2, JPEG-Baseline compressed; pydicom decodes them
with pillow. Other inputs are handled too: MONOCHROME1 is inverted, 16-bit data is windowed
to its own min/max. Every failure is a :class:`DicomError` naming the file.

Memory is bounded on hostile files: the decoded size the header declares (rows x columns x
bits allocated x samples x frames) must be at most ``max_mib`` (config ``data.max_dicom_mib``)
before any pixel is decoded, and a deflate-compressed file (transfer syntax
1.2.840.10008.1.2.1.99, which pydicom would inflate whole, even for the header) is inflated
here in bounded steps, only as far as the read needs, and refused past the limit plus
:data:`HEADER_SLACK_MIB`.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from tfpneumo.data.labels import check_id
from tfpneumo.errors import TfpneumoError, first_line

META_KEYS = ("patient_id", "patient_age", "patient_sex", "view_position", "sop_instance_uid")
# Default of data.max_dicom_mib: 8192 x 8192 at 16 bits (SIIM: 1024 x 1024 at 8 bits, 1 MiB).
MAX_DICOM_MIB = 128
# What a deflated file may inflate to beyond its pixels: the header elements (overlays, icons,
# private tags); a real header is a few KiB.
HEADER_SLACK_MIB = 16
_DEFLATED = "1.2.840.10008.1.2.1.99"
_INFLATE_STEP = 1 << 20  # at most this many bytes inflated per zlib call
_MIB = 1 << 20


class DicomError(TfpneumoError):
    """A DICOM file or folder cannot be used (not DICOM, truncated, no pixels, ...)."""


class _TooLarge(Exception):
    """A deflated stream inflates past its limit (raised inside pydicom's reader)."""


class _BoundedInflate(io.RawIOBase):
    """The inflated dataset of a deflated DICOM as a seekable stream: inflated on demand (a
    read of n bytes inflates about n bytes), at most ``limit`` bytes in all, else _TooLarge."""

    def __init__(self, raw: io.BufferedIOBase, limit: int) -> None:
        super().__init__()
        self._raw, self._limit = raw, limit
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _fill(self, upto: int) -> None:
        while len(self._buf) < upto and not self._done:
            if self._z.eof:
                self._done = True
                break
            data = self._z.unconsumed_tail or self._raw.read(1 << 16)
            room = min(upto - len(self._buf), _INFLATE_STEP, self._limit + 1 - len(self._buf))
            out = self._z.decompress(data, room)
            self._buf += out
            if len(self._buf) > self._limit:
                raise _TooLarge(self._limit)
            if not out and not data:  # the file ended (a truncated stream: short reads)
                self._done = True

    def read(self, n: int | None = -1) -> bytes:
        # RawIOBase.read(n) would allocate n bytes before filling them: n is a length field
        # of the file (up to 4 GiB), so only what the stream holds is copied out.
        if n is None or n < 0:
            self._fill(self._limit + 1)
            n = len(self._buf)
        self._fill(self._pos + n)
        with memoryview(self._buf) as view:
            chunk = bytes(view[self._pos:self._pos + n])
        self._pos += len(chunk)
        return chunk

    def readinto(self, b) -> int:
        chunk = self.read(len(b))
        b[:len(chunk)] = chunk
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            self._fill(self._limit + 1)
            offset += len(self._buf)
        elif whence == io.SEEK_CUR:
            offset += self._pos
        if offset < 0:
            raise OSError(f"negative seek position {offset}")
        self._pos = offset
        return offset

    def tell(self) -> int:
        return self._pos


def file_kind(mode: int) -> str:
    """What a non-regular file is, from its ``st_mode``: "a FIFO", "a folder", ..."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a file"


def not_regular(path: str | Path) -> str | None:
    """Why ``path`` is not a regular file that can be read without blocking ("not a regular
    file (a FIFO)", ...), or None when it is one. Reading a FIFO waits for a writer forever;
    a symlink is followed (a broken one is named as such)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not a regular file (a broken symlink)" if os.path.islink(path) else None
    except OSError:
        return None  # the reader names the error
    return None if stat.S_ISREG(mode) else f"not a regular file ({file_kind(mode)})"


def _open_regular(path: Path):
    """``open(path, "rb")``, refusing anything but a regular file without blocking: the file
    is opened non-blocking (a FIFO without a writer would block the open itself), checked on
    its descriptor (no race with a rename), then switched back to blocking reads."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise DicomError(f"{path}: not a regular file ({file_kind(mode)})")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return open(path, "rb", opener=lambda *_: fd)  # the file's name stays ``path``
    except BaseException:
        os.close(fd)
        raise


def _dcmread(path: Path, stop_before_pixels: bool, max_mib: float) -> Any:
    """``pydicom.dcmread``, except that a deflated file is inflated by :class:`_BoundedInflate`
    (pydicom's own reader inflates the whole file first), and that the declared image size of
    a full read is checked (:func:`_check_size`) before its pixel data is read when that could
    be large: a deflated file, or a file larger than the limit."""
    import pydicom
    from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_dataset, read_preamble

    limit = int((max_mib + HEADER_SLACK_MIB) * _MIB)
    with _open_regular(path) as fp:
        preamble = read_preamble(fp, False)
        file_meta = _read_file_meta_info(fp)
        start = fp.tell()
        if str(file_meta.get("TransferSyntaxUID", "")).strip("\x00 ") != _DEFLATED:
            if not stop_before_pixels and os.fstat(fp.fileno()).st_size > limit:
                fp.seek(0)
                _check_size(path, pydicom.dcmread(fp, stop_before_pixels=True), max_mib)
            fp.seek(0)
            return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
        for header_only in (True, False) if not stop_before_pixels else (True,):
            fp.seek(start)
            try:
                dataset = read_dataset(_BoundedInflate(fp, limit), is_implicit_VR=False,
                                       is_little_endian=True,
                                       stop_when=_at_pixel_data if header_only else None)
            except _TooLarge:
                raise DicomError(f"{path}: deflated data inflates to more than {limit // _MIB} "
                                 f"MiB (data.max_dicom_mib {max_mib:g} + {HEADER_SLACK_MIB} MiB "
                                 "of header); refused") from None
            if header_only:
                _check_size(path, dataset, max_mib)
    ds = pydicom.dataset.FileDataset(str(path), dataset, preamble, file_meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def _check_size(path: Path, ds: Any, max_mib: float) -> None:
    """Refuses pixel data whose declared decoded size exceeds ``max_mib`` MiB."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        bits = int(ds.get("BitsAllocated", 8) or 8)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(str(ds.get("NumberOfFrames", 1) or 1).strip() or 1)
    except Exception as e:  # also the lazy parsing errors of a corrupt element
        raise DicomError(f"{path}: invalid image size in header ({first_line(e)})") from e
    if min(rows, cols, bits, samples, frames) < 0:
        raise DicomError(f"{path}: negative image size in header ({rows}x{cols}, {bits} bits)")
    mib = rows * cols * max(bits, 1) * samples * frames / 8 / _MIB
    if mib > max_mib:
        more = f" x {samples} samples" if samples != 1 else ""
        more += f" x {frames} frames" if frames != 1 else ""
        raise DicomError(f"{path}: {rows}x{cols} pixels at {bits} bits{more} is {mib:.0f} MiB "
                         f"decoded, over data.max_dicom_mib {max_mib:g}; refused")


def find_dicoms(root: str | Path, bad: list[tuple[Path, str]] | None = None) -> dict[str, Path]:
    """Image id (file stem, the SOPInstanceUID) -> path for every ``*.dcm`` below ``root``.

    Any depth is searched (train: ``<study>/<series>/<sop>.dcm``, test: flat). Two files with
    the same stem raise, naming both. A stem that could act as a path (``..``, ``\\``, NUL)
    or a ``.dcm`` that is not a regular file (a FIFO, a socket, a broken symlink) raises too,
    or is appended to ``bad`` as ``(path, reason)`` when ``bad`` is given (with folders named
    ``*.dcm``, which are searched all the same).
    """
    root = Path(root)
    if not root.is_dir():
        raise DicomError(f"{root}: DICOM folder not found")
    found: dict[str, Path] = {}

    def fail(e: OSError) -> None:
        raise DicomError(f"{e.filename or root}: cannot read folder ({e.strerror or e})")

    for folder, dirs, files in os.walk(root, onerror=fail):
        dirs.sort()
        if bad is not None:  # searched like any folder, and listed: it is no DICOM file
            bad.extend((Path(folder) / name, "not a regular file (a folder)")
                       for name in dirs if name.lower().endswith(".dcm"))
        for name in sorted(files):
            if not name.lower().endswith(".dcm"):
                continue
            path = Path(folder) / name
            image_id = name[: -len(".dcm")]
            # os.walk lists FIFOs, sockets, devices and broken symlinks as files; reading a
            # FIFO would wait for a writer forever.
            reason = not_regular(path) or check_id(image_id)
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


def _read(path: Path, stop_before_pixels: bool, max_mib: float) -> tuple[Any, list[str]]:
    """:func:`_dcmread` with errors turned into :class:`DicomError`; also returns the
    warnings pydicom emitted (a truncated file only gives a warning and a dataset without
    its last elements)."""
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = _dcmread(path, stop_before_pixels, max_mib)
        except DicomError:
            raise
        except InvalidDicomError as e:
            raise DicomError(f"{path}: not a DICOM file ({first_line(e)})") from e
        except FileNotFoundError as e:
            raise DicomError(f"{path}: file not found") from e
        except OSError as e:
            if e.errno == errno.ENXIO:  # open() of a socket
                raise DicomError(f"{path}: not a regular file (a socket)") from e
            raise DicomError(f"{path}: truncated or unreadable DICOM ({first_line(e)})") from e
        except EOFError as e:
            raise DicomError(f"{path}: truncated or unreadable DICOM ({first_line(e)})") from e
        except Exception as e:  # pydicom raises assorted errors on corrupt element streams
            raise DicomError(f"{path}: corrupt DICOM ({first_line(e)})") from e
    return ds, [str(w.message).splitlines()[0] for w in caught]


def read_header(path: str | Path, max_mib: float = MAX_DICOM_MIB) -> dict:
    """Metadata of a DICOM without decoding its pixels (cheap: ~1 ms).

    Returns :data:`META_KEYS` plus ``height`` and ``width`` (Rows, Columns; 0 when absent).
    Pixel data whose declared size exceeds ``max_mib`` MiB raises here already.
    """
    import pydicom.config

    path = Path(path)
    # Stage-2 test files use "ID_..." as SOPInstanceUID, which pydicom warns about.
    with pydicom.config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds, _ = _read(path, stop_before_pixels=True, max_mib=max_mib)
        _check_size(path, ds, max_mib)
        meta = _header(path, ds)
        try:
            meta["height"], meta["width"] = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        except Exception as e:  # also the lazy parsing errors of a corrupt element
            raise DicomError(f"{path}: invalid Rows/Columns ({first_line(e)})") from e
    return meta


def read_dataset_header(path: str | Path, max_mib: float = MAX_DICOM_MIB) -> Any:
    """The pydicom Dataset of a DICOM without its pixel data (``file_meta`` included), with the
    checks of :func:`read_header`; for writers that copy header elements (DICOM SEG)."""
    import pydicom.config

    path = Path(path)
    with pydicom.config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds, _ = _read(path, stop_before_pixels=True, max_mib=max_mib)
        _check_size(path, ds, max_mib)
        _header(path, ds)  # a corrupt element raises here, naming the file
    return ds


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


def read_dicom(path: str | Path, max_mib: float = MAX_DICOM_MIB) -> tuple[np.ndarray, dict]:
    """Decodes one DICOM: ``(H, W) uint8`` pixels and its metadata (see :data:`META_KEYS`).

    Raises :class:`DicomError` naming the file when it is not a DICOM, truncated or corrupt,
    has no pixel data, is not a single 2-D grayscale frame, or declares pixel data larger
    than ``max_mib`` MiB decoded (checked before anything is decoded).
    """
    import pydicom.config

    path = Path(path)
    with pydicom.config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # _read checks the declared size before reading pixel data that could be large; here
        # it is checked again before decoding (a JPEG of 60000 x 60000 is small on disk).
        ds, problems = _read(path, stop_before_pixels=False, max_mib=max_mib)
        _check_size(path, ds, max_mib)
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
