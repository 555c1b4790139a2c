"""Label CSV reading: the real files' quirks, unions, and errors that name file and row."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest

from tfpneumo import TfpneumoError
from tfpneumo.data import rle
from tfpneumo.data.labels import (
    LabelError,
    check_rle_syntax,
    find_labels,
    read_label_table,
    read_labels,
)

FOUR_ROWS = "1.2.276.0.7230010.3.1.4.8323329.307.1517875162.311533"


def _naive(path: Path) -> dict[str, list[str]]:
    """Independent reader: split each line at its first comma."""
    out: dict[str, list[str]] = {}
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()[1:]
    for line in lines:
        image_id, value = line.split(",", 1)
        out.setdefault(image_id.strip(), [])
        if value.strip() != "-1":
            out[image_id.strip()].append(value.strip())
    return out


def test_real_mini_csv(siim_mini):
    path = siim_mini / "train-rle.csv"
    assert path.read_text().startswith("ImageId, EncodedPixels")  # the leading-space header
    labels = read_labels(path)
    assert labels == _naive(path)
    assert len(labels) == 48
    assert sum(1 for rles in labels.values() if rles) == 15
    assert len(labels[FOUR_ROWS]) == 4


def test_real_stage2_gzip(siim_dir):
    labels = read_labels(siim_dir / "stage_2_train.csv.gz")
    # Figures from the data README: 12,047 images, 3,576 positive rows.
    assert len(labels) == 12047
    assert sum(len(rles) for rles in labels.values()) == 3576
    assert labels == _naive(siim_dir / "stage_2_train.csv.gz")


def test_real_stage2_sample_submission_ids(siim_dir):
    labels = read_labels(siim_dir / "stage_2_sample_submission.csv")
    assert len(labels) == 3205
    assert all(i.startswith("ID_") and rles == [] for i, rles in labels.items())


@pytest.mark.parametrize("header", ["ImageId,EncodedPixels", "ImageId, EncodedPixels",
                                    "\ufeffImageId, EncodedPixels", "EncodedPixels,ImageId"])
@pytest.mark.parametrize("gz", [False, True])
def test_header_variants_bom_gzip(tmp_path, header, gz):
    rows = [("ID_0011fe81e", " -1"), ("img.1", "5 2 2 2"), ("img.1", " 0 1"), ("img.2", "-1")]
    if header.startswith("Encoded"):
        rows = [(b, a) for a, b in rows]
    text = header + "\n" + "".join(f"{a},{b}\n" for a, b in rows)
    path = tmp_path / ("labels.csv.gz" if gz else "labels.csv")
    if gz:
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    labels = read_labels(path)
    assert labels == {"ID_0011fe81e": [], "img.1": ["5 2 2 2", "0 1"], "img.2": []}
    # The union of the rows of img.1 on a 4x4 image: the 2x2 square plus pixel (0, 0).
    expected = np.zeros((4, 4), np.uint8)
    expected[1:3, 1:3] = 1
    expected[0, 0] = 1
    np.testing.assert_array_equal(rle.decode_rows(labels["img.1"], (4, 4)), expected)


def test_rows_and_line_numbers_with_blank_lines_and_crlf(tmp_path):
    path = tmp_path / "l.csv"
    path.write_bytes(b"ImageId,EncodedPixels\r\na,-1\r\n\r\nb,1 2\r\nb,-1\r\n")
    table = read_label_table(path)
    # Line 5 is the "b,-1" row (line 3 is blank): b is refused, a kept.
    assert list(table.rows) == ["a"]
    assert [(i, line) for i, line, _ in table.problems] == [("b", 5)]
    with pytest.raises(LabelError, match=r"l\.csv: row 5: .*both a -1 row \(row 5\) and an RLE "
                                         r"row \(row 4\)"):
        read_labels(path)


@pytest.mark.parametrize("value, message", [
    ("1 2 3", "odd number"),
    ("1 x", "not a non-negative integer"),
    ("-3 2", "not a non-negative integer"),
    ("4 0", "length 0"),
    ("1.5 2", "not a non-negative integer"),
])
def test_malformed_rle_names_file_and_row(tmp_path, value, message):
    path = tmp_path / "bad.csv"
    path.write_text(f"ImageId,EncodedPixels\na,-1\nb,5 2\nc,{value}\n")
    with pytest.raises(LabelError, match=rf"bad\.csv: row 4: malformed RLE.*{message}"):
        read_labels(path)
    table = read_label_table(path)  # the lenient reader keeps the good images
    assert sorted(table.rows) == ["a", "b"]
    assert table.problems[0][:2] == ("c", 4)


def test_syntax_check_agrees_with_rle_decoder():
    # Every string the syntax check accepts decodes on a big enough image, and every string
    # it refuses is refused by the decoder on any image.
    for text in ["5 2 2 2", "0 1", "1 2 3", "1 x", "4 0", "3 1 0 1", "١ 2"]:
        ok = check_rle_syntax(text) is None
        try:
            rle.decode(text, (64, 64))
            decodes = True
        except rle.RLEError:
            decodes = False
        assert ok == decodes, text


@pytest.mark.parametrize("image_id", ["../evil", "a/b", "a\\b", ""])
def test_ids_that_look_like_paths_are_refused(tmp_path, image_id):
    path = tmp_path / "ids.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["ImageId", "EncodedPixels"], ["ok", "-1"], [image_id, "-1"]])
    with pytest.raises(LabelError, match=r"ids\.csv: row 3: .*ImageId"):
        read_labels(path)


def test_missing_columns_and_bad_files(tmp_path):
    path = tmp_path / "cols.csv"
    path.write_text("ImageId,Mask\na,-1\n")
    with pytest.raises(LabelError, match=r"cols\.csv: row 1: missing column\(s\) EncodedPixels"):
        read_labels(path)
    path.write_text("ImageId,EncodedPixels\na\n")
    with pytest.raises(LabelError, match=r"cols\.csv: row 2: expected ImageId,EncodedPixels"):
        read_labels(path)
    path.write_text("")
    with pytest.raises(LabelError, match="empty file"):
        read_labels(path)
    path.write_bytes(b"ImageId,EncodedPixels\n\xff\xfe,-1\n")
    with pytest.raises(LabelError, match="not a readable CSV"):
        read_labels(path)
    gz = tmp_path / "x.csv.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(LabelError, match=r"x\.csv\.gz: not a readable CSV"):
        read_labels(gz)
    with pytest.raises(LabelError, match="not found"):
        read_labels(tmp_path / "missing.csv")
    assert issubclass(LabelError, TfpneumoError)


def test_find_labels(tmp_path):
    with pytest.raises(LabelError, match="no label CSV found"):
        find_labels(tmp_path)
    (tmp_path / "stage_2_train.csv.gz").write_bytes(b"")
    assert find_labels(tmp_path).name == "stage_2_train.csv.gz"
    (tmp_path / "stage_2_train.csv").write_text("")
    assert find_labels(tmp_path).name == "stage_2_train.csv"
    (tmp_path / "train-rle.csv").write_text("")
    assert find_labels(tmp_path).name == "train-rle.csv"
