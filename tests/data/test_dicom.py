"""DICOM reading on the real SIIM files, plus broken copies of them."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from tfpneumo import TfpneumoError
from tfpneumo.data.dicom import (
    META_KEYS,
    DicomError,
    find_dicoms,
    read_dicom,
    read_header,
    to_uint8,
)


@pytest.fixture(scope="module")
def mini_files(siim_mini) -> tuple[dict[str, Path], dict[str, Path]]:
    return (find_dicoms(siim_mini / "dicom-images-train"),
            find_dicoms(siim_mini / "dicom-images-test"))


def _jpeg_oracle(path: Path) -> np.ndarray:
    """Independent decode: the JPEG stream out of the DICOM, decoded by OpenCV's libjpeg."""
    import cv2
    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    return cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_GRAYSCALE)


def test_every_real_dicom(mini_files, siim_mini):
    train, test = mini_files
    assert len(train) == 48 and len(test) == 10
    labelled = {line.split(",")[0] for line in
                (siim_mini / "train-rle.csv").read_text().splitlines()[1:]}
    assert set(train) == labelled
    with warnings.catch_warnings():
        # The ID_... SOPInstanceUIDs of the test files must not make pydicom warn.
        warnings.simplefilter("error")
        for split, files in (("train", train), ("test", test)):
            for image_id, path in files.items():
                pixels, meta = read_dicom(path)
                assert pixels.shape == (1024, 1024) and pixels.dtype == np.uint8
                assert 0 < pixels.std()
                assert set(META_KEYS) <= set(meta)
                assert meta["sop_instance_uid"] == image_id
                assert isinstance(meta["patient_age"], int) and 0 < meta["patient_age"] < 120
                assert meta["patient_sex"] in ("M", "F")
                assert meta["view_position"] in ("AP", "PA")
                assert bool(meta["patient_id"]) == (split == "train")
                header = read_header(path)
                assert {k: header[k] for k in META_KEYS} == meta
                assert (header["height"], header["width"]) == (1024, 1024)
    assert all(i.startswith("ID_") for i in test)


def test_pixels_match_independent_jpeg_decoder(mini_files):
    train, test = mini_files
    for path in [*list(train.values())[:3], *list(test.values())[:2]]:
        pixels, _ = read_dicom(path)
        oracle = _jpeg_oracle(path)
        diff = np.abs(pixels.astype(int) - oracle.astype(int))
        # Two libjpeg builds may round the IDCT differently by a level or so.
        assert diff.max() <= 3 and diff.mean() < 0.1, path


def test_16bit_monochrome1_is_windowed_and_inverted(mini_files, tmp_path):
    import pydicom

    src = next(iter(mini_files[0].values()))
    ds = pydicom.dcmread(src)
    rng = np.random.default_rng(0)
    arr = rng.integers(100, 4000, size=(40, 30)).astype(np.uint16)
    arr[0, 0], arr[0, 1] = 100, 3999
    ds.set_pixel_data(arr, "MONOCHROME1", 12)
    ds.save_as(tmp_path / "m1.dcm")
    pixels, _ = read_dicom(tmp_path / "m1.dcm")
    expected = 255 - np.rint((arr - 100.0) * 255.0 / 3899.0).astype(np.uint8)
    np.testing.assert_array_equal(pixels, expected)
    assert pixels[0, 0] == 255 and pixels[0, 1] == 0


def test_to_uint8_edge_cases():
    np.testing.assert_array_equal(to_uint8(np.full((2, 3), 7, np.int16)), np.zeros((2, 3)))
    u8 = np.array([[0, 10], [200, 255]], np.uint8)
    np.testing.assert_array_equal(to_uint8(u8), u8)  # 8-bit data is not stretched
    np.testing.assert_array_equal(to_uint8(u8, monochrome1=True), 255 - u8)
    signed = np.array([[-1000, 0], [1000, 24]], np.int16)
    np.testing.assert_array_equal(to_uint8(signed), [[0, 128], [255, 131]])


def test_rgb_is_refused(mini_files, tmp_path):
    import pydicom

    ds = pydicom.dcmread(next(iter(mini_files[0].values())))
    ds.set_pixel_data(np.zeros((8, 8, 3), np.uint8), "RGB", 8)
    ds.save_as(tmp_path / "rgb.dcm")
    with pytest.raises(DicomError, match=r"rgb\.dcm: expected one 2-D grayscale frame"):
        read_dicom(tmp_path / "rgb.dcm")


def test_broken_files_name_the_file(mini_files, tmp_path):
    import pydicom

    src = next(iter(mini_files[1].values()))
    data = src.read_bytes()
    (tmp_path / "half.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(DicomError, match=r"half\.dcm: truncated file"):
        read_dicom(tmp_path / "half.dcm")
    (tmp_path / "garbage.dcm").write_bytes(b"\x00garbage" * 50)
    for reader in (read_dicom, read_header):
        with pytest.raises(DicomError, match=r"garbage\.dcm: not a DICOM file"):
            reader(tmp_path / "garbage.dcm")
    soi = data.find(b"\xff\xd8\xff")  # start of the JPEG stream: wipe its headers
    (tmp_path / "jpeg.dcm").write_bytes(data[:soi] + bytes(400) + data[soi + 400:])
    with pytest.raises(DicomError, match=r"jpeg\.dcm: cannot decode pixel data"):
        read_dicom(tmp_path / "jpeg.dcm")
    ds = pydicom.dcmread(src)
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(DicomError, match=r"nopixels\.dcm: no pixel data"):
        read_dicom(tmp_path / "nopixels.dcm")
    with pytest.raises(DicomError, match=r"absent\.dcm: file not found"):
        read_dicom(tmp_path / "absent.dcm")
    assert issubclass(DicomError, TfpneumoError)


def test_find_dicoms_layouts_and_errors(mini_files, tmp_path):
    src = next(iter(mini_files[1].values()))
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(src, tmp_path / "a" / "b" / "x.1.dcm")
    shutil.copy(src, tmp_path / "y.DCM")
    (tmp_path / "notes.txt").write_text("ignored")
    assert find_dicoms(tmp_path) == {"x.1": tmp_path / "a" / "b" / "x.1.dcm",
                                     "y": tmp_path / "y.DCM"}
    shutil.copy(src, tmp_path / "a" / "x.1.dcm")
    twice = r"x\.1 appears twice: .*/a/x\.1\.dcm and .*/a/b/x\.1\.dcm$"
    with pytest.raises(DicomError, match=twice):
        find_dicoms(tmp_path)
    (tmp_path / "a" / "x.1.dcm").unlink()
    shutil.copy(src, tmp_path / "odd..name.dcm")
    with pytest.raises(DicomError, match=r"odd\.\.name\.dcm: ImageId"):
        find_dicoms(tmp_path)
    bad: list = []
    assert set(find_dicoms(tmp_path, bad)) == {"x.1", "y"}
    assert [p.name for p, _ in bad] == ["odd..name.dcm"]
    with pytest.raises(DicomError, match="DICOM folder not found"):
        find_dicoms(tmp_path / "nope")


def test_unreadable_folder_is_one_line_error(tmp_path, monkeypatch):
    import os

    (tmp_path / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    # Root ignores chmod, so the refusal is simulated where os.walk lists a folder.
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DicomError, match=r"locked: cannot read folder \(Permission denied\)$"):
        find_dicoms(tmp_path)


def test_readers_refuse_a_fifo_without_waiting_for_a_writer(tmp_path):
    """predict reads the files it is given, submit the ones find_dicoms finds: a FIFO named
    x.dcm is one line naming it (opened non-blocking, checked on the descriptor)."""
    import os
    import threading

    fifo = tmp_path / "x.dcm"
    os.mkfifo(fifo)
    errors: list[str] = []

    def run() -> None:
        for read in (read_header, read_dicom):
            try:
                read(fifo)
            except DicomError as e:
                errors.append(str(e))
        try:
            find_dicoms(tmp_path)
        except DicomError as e:
            errors.append(str(e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=20)
    if thread.is_alive():  # the regression: unblock the reader (EOF), then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("a DICOM reader waited on a FIFO")
    assert errors == [f"{fifo}: not a regular file (a FIFO)"] * 3
