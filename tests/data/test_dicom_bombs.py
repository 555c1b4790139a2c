"""Decompression bombs (issue 11): DICOMs that declare huge images, and deflate-compressed
DICOMs (transfer syntax 1.2.840.10008.1.2.1.99) that inflate to far more than their size.

The hostile files are built here, small on disk: a deflate stream of zeros is repeated
1 MiB block by block, so a 381 MiB image costs ~400 KB and no large buffer. Each read is
watched with tracemalloc: refusing a bomb must allocate no more than a few MiB.
"""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from tfpneumo.data.dicom import HEADER_SLACK_MIB, MAX_DICOM_MIB, DicomError, read_dicom, read_header

DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT = "1.2.840.10008.1.2.1"
MIB = 1 << 20


def _dataset(rows: int, cols: int, bits: int, transfer_syntax: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, SecondaryCaptureImageStorage

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    fm.MediaStorageSOPInstanceUID = "1.2.3.4"
    fm.TransferSyntaxUID = transfer_syntax
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientID = "p1"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def hostile_dicom(path: Path, rows: int, cols: int, bits: int = 8, *, pixel_bytes: int | None = None,
                  private_bytes: int = 0, deflated: bool = True) -> Path:
    """A DICOM declaring ``rows`` x ``cols`` at ``bits`` whose pixel data element holds
    ``pixel_bytes`` zeros (default: what the header declares); ``private_bytes`` zeros in a
    private OB element before the pixels. Deflated: the dataset is one raw deflate stream."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = _dataset(rows, cols, bits, DEFLATED if deflated else EXPLICIT)
    if private_bytes:
        ds.add_new(0x00290010, "LO", "hostile")  # private creator of (0029,10xx)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    head = body.getvalue()
    if private_bytes:  # (0029,1000) OB follows the last (0028,xxxx) element; zeros follow it
        head += struct.pack("<HH2sHI", 0x0029, 0x1000, b"OB", 0, private_bytes)
    n = rows * cols * bits // 8 if pixel_bytes is None else pixel_bytes
    segments = [(head, 0)] if not private_bytes else [(head, private_bytes)]
    segments.append((struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW" if bits > 8 else b"OB", 0, n), n))
    meta = io.BytesIO()
    meta.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(meta, ds.file_meta)
    out = [meta.getvalue()]
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS) if deflated else None
    zeros = bytes(MIB)
    for prefix, count in segments:
        out.append(c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH) if c else prefix)
        if count:
            # After a full flush the compressor keeps no history: the same 1 MiB of zeros
            # compresses to the same bytes every time, so one block is repeated.
            block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH) if c else zeros
            out.append(block * (count // MIB))
            rest = count % MIB
            out.append(c.compress(zeros[:rest]) + c.flush(zlib.Z_FULL_FLUSH) if c else zeros[:rest])
    if c:
        out.append(c.flush())
    path.write_bytes(b"".join(out))
    return path


def _refused(call, path: Path, *needles: str, budget_mib: float = 8) -> str:
    """``call()`` raises a one-line DicomError naming ``path`` and containing ``needles``,
    with at most ``budget_mib`` MiB allocated at the peak (tracemalloc: Python and NumPy)."""
    tracemalloc.start()
    try:
        with pytest.raises(DicomError) as e:
            call()
        peak = tracemalloc.get_traced_memory()[1] / MIB
    finally:
        tracemalloc.stop()
    error = str(e.value)
    assert error.startswith(f"{path}: ") and "\n" not in error, error
    assert all(n in error for n in needles), error
    assert peak < budget_mib, f"{peak:.1f} MiB traced while refusing {path.name}: {error}"
    return error


def test_small_deflated_dicom_reads_like_pydicom_wrote_it(tmp_path):
    import pydicom

    pixels = np.random.default_rng(0).integers(0, 255, (64, 48), np.uint8)
    ds = _dataset(64, 48, 8, DEFLATED)
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "ok.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "ok.dcm").file_meta.TransferSyntaxUID == DEFLATED
    got, meta = read_dicom(tmp_path / "ok.dcm")
    assert np.array_equal(got, pixels) and meta["patient_id"] == "p1"
    assert read_header(tmp_path / "ok.dcm")["height"] == 64
    # the test's own builder writes what pydicom reads too (zeros: windowed to 0)
    built = hostile_dicom(tmp_path / "built.dcm", 64, 48)
    assert pydicom.dcmread(built).Rows == 64
    assert read_dicom(built)[0].shape == (64, 48)


def test_deflated_bomb_is_refused_from_its_header(tmp_path):
    # 20000 x 20000 of zeros: 381 MiB inflated from a ~400 KB file. pydicom alone inflates it
    # whole even for the header; here only the header is inflated, then the size refused.
    bomb = hostile_dicom(tmp_path / "bomb.dcm", 20000, 20000)
    assert bomb.stat().st_size < 1 * MIB
    for call in (lambda: read_header(bomb), lambda: read_dicom(bomb)):
        _refused(call, bomb, "20000x20000 pixels at 8 bits is 381 MiB decoded",
                 f"over data.max_dicom_mib {MAX_DICOM_MIB}")


def test_declared_size_is_checked_before_decoding_uncompressed_too(tmp_path):
    # 60000 x 60000 at 16 bits claimed, 1 KiB of pixels present
    liar = hostile_dicom(tmp_path / "liar.dcm", 60000, 60000, 16, pixel_bytes=1024, deflated=False)
    for call in (lambda: read_header(liar), lambda: read_dicom(liar)):
        _refused(call, liar, "60000x60000 pixels at 16 bits is 6866 MiB decoded")
    # a lower limit refuses an ordinary image; a higher one reads it
    small = hostile_dicom(tmp_path / "small.dcm", 1024, 1024, deflated=False)
    _refused(lambda: read_dicom(small, max_mib=0.5), small, "is 1 MiB decoded, over data.max_dicom_mib 0.5")
    assert read_dicom(small, max_mib=1)[0].shape == (1024, 1024)
    # a file larger than the limit on disk: its header is checked before its pixels are read
    big = hostile_dicom(tmp_path / "big.dcm", 2048, 2048, pixel_bytes=20 * MIB, deflated=False)
    _refused(lambda: read_dicom(big, max_mib=1), big, "2048x2048 pixels at 8 bits is 4 MiB")


def test_deflated_stream_longer_than_its_header_says_is_cut_off(tmp_path):
    # A 64 x 64 header with 40 MiB of pixel data, and one with a 40 MiB private element before
    # the pixels: inflating stops at max_mib + HEADER_SLACK_MIB (here 1 + 16 MiB).
    limit = f"more than {1 + HEADER_SLACK_MIB} MiB"
    long_pixels = hostile_dicom(tmp_path / "long.dcm", 64, 64, pixel_bytes=40 * MIB)
    _refused(lambda: read_dicom(long_pixels, max_mib=1), long_pixels, limit, budget_mib=40)
    assert read_header(long_pixels, max_mib=1)["height"] == 64  # the header alone is fine
    padded = hostile_dicom(tmp_path / "padded.dcm", 64, 64, private_bytes=40 * MIB)
    for call in (lambda: read_header(padded, max_mib=1), lambda: read_dicom(padded, max_mib=1)):
        _refused(call, padded, limit, budget_mib=40)


def test_truncated_deflated_stream_is_a_dicom_error(tmp_path):
    whole = hostile_dicom(tmp_path / "whole.dcm", 256, 256)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole.read_bytes()[:-60])
    with pytest.raises(DicomError, match=f"^{cut}: "):
        read_dicom(cut)


# ----------------------------------------------------------------------------- the commands

@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A synthetic SIIM folder: 4 train (2 positive) + 1 test images of 64 px."""
    from tfpneumo.data.synth import synthesize

    synthesize(tmp_path / "data", n_train=4, n_test=1, size=64, positive_rate=0.5, seed=4)
    return tmp_path / "data"


def test_prepare_skips_bombs_and_lists_them(tiny_data, tmp_path, tf):
    from tfpneumo.config import load_config
    from tfpneumo.data.prepare import prepare_cache

    test_dir, train_dir = tiny_data / "dicom-images-test", tiny_data / "dicom-images-train"
    hostile_dicom(test_dir / "bomb.dcm", 20000, 20000)  # refused from its header, when planning
    hostile_dicom(train_dir / "long.dcm", 64, 64, pixel_bytes=40 * MIB)  # when decoding
    with open(tiny_data / "train-rle.csv", "a", encoding="utf-8") as f:
        f.write("long, -1\n")
    cfg = load_config(None, ["prepare.size=64", "prepare.folds=2", "prepare.workers=1",
                             "data.max_dicom_mib=1"])
    summary = prepare_cache(tiny_data, tmp_path / "cache", cfg, progress=False)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    reasons = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    assert reasons["bomb.dcm"] == ("20000x20000 pixels at 8 bits is 381 MiB decoded, over "
                                   "data.max_dicom_mib 1; refused")
    assert reasons["long.dcm"].startswith("deflated data inflates to more than 17 MiB")
    assert manifest["counts"]["train"] == 4 and manifest["counts"]["test"] == 1, summary


def test_predict_and_submit_give_one_line_errors(tiny_data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tfpneumo.cli import app

    bomb = hostile_dicom(tiny_data / "dicom-images-test" / "bomb.dcm", 20000, 20000)
    sample = tiny_data / "sample_submission.csv"
    sample.write_text(sample.read_text().rstrip("\n") + "\nbomb,-1\n")
    monkeypatch.chdir(tmp_path)  # no run folder: both fail on the DICOM before any model
    for args in (["predict", str(bomb), "--out", str(tmp_path / "pred")],
                 ["submit", "--data", str(tiny_data), "--out", str(tmp_path / "sub.csv")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert errors == [f"error: {bomb}: 20000x20000 pixels at 8 bits is 381 MiB decoded, "
                          f"over data.max_dicom_mib {MAX_DICOM_MIB}; refused"], result.output
    assert not (tmp_path / "pred").exists() and not (tmp_path / "sub.csv").exists()
