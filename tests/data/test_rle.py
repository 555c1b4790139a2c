"""RLE codecs against hand-worked cases, a slow pure-Python reference and the real labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tfpneumo import TfpneumoError
from tfpneumo.data.rle import RLEError, decode, decode_rows, encode

FMTS = ("relative", "standard")


# --- slow, obviously correct reference (pixel loops over mask.T.flatten()) -------------------


def ref_encode(mask: np.ndarray, fmt: str) -> str:
    flat = [int(v != 0) for v in np.asarray(mask).T.flatten()]
    runs = []
    i = 0
    while i < len(flat):
        if flat[i]:
            j = i
            while j < len(flat) and flat[j]:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    if not runs:
        return "-1"
    out: list[int] = []
    prev_end = 0
    for start, length in runs:
        if fmt == "relative":
            out += [start - prev_end, length]
        else:
            out += [start + 1, length]
        prev_end = start + length
    return " ".join(str(v) for v in out)


def ref_decode(rle: str, shape: tuple[int, int], fmt: str) -> np.ndarray | None:
    """The mask, or None when the string breaks one of the documented rules."""
    height, width = shape
    n = height * width
    flat = [0] * n
    if rle.strip() in ("", "-1"):
        return np.zeros(shape, np.uint8)
    tokens = rle.split()
    if not all(t.isascii() and t.isdigit() for t in tokens) or len(tokens) % 2:
        return None
    nums = [int(t) for t in tokens]
    prev_end = 0
    for k in range(0, len(nums), 2):
        first, length = nums[k], nums[k + 1]
        if length < 1:
            return None
        if fmt == "relative":
            start = prev_end + first
        else:
            if first < 1:
                return None
            start = first - 1
            if start < prev_end:  # backward or overlapping
                return None
        if start + length > n:
            return None
        for p in range(start, start + length):
            flat[p] = 1
        prev_end = start + length
    return np.array(flat, dtype=np.uint8).reshape(width, height).T


def square(rows: slice, cols: slice, shape=(4, 4)) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[rows, cols] = 1
    return m


# --- hand-worked cases ---------------------------------------------------------------------

HAND = [
    # (mask, relative, standard)
    (square(slice(1, 3), slice(1, 3)), "5 2 2 2", "6 2 10 2"),
    (square(slice(0, 1), slice(0, 1)), "0 1", "1 1"),  # first pixel
    (square(slice(3, 4), slice(3, 4)), "15 1", "16 1"),  # last pixel
    (square(slice(2, 4), slice(3, 4)), "14 2", "15 2"),  # run ending on the last pixel
    (square(slice(0, 4), slice(0, 4)), "0 16", "1 16"),  # whole image
    (square(slice(0, 2), slice(0, 1)), "0 2", "1 2"),  # run starting at pixel 0
    (square(slice(2, 3), slice(1, 2)), "6 1", "7 1"),  # single pixel
    (np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]), "0 1 1 1", "1 1 3 1"),
    # run crossing a column boundary: (3, 0) and (0, 1) are flat 3 and 4
    (np.array([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]), "3 2", "4 2"),
    (np.zeros((4, 4), np.uint8), "-1", "-1"),
]


@pytest.mark.parametrize("mask, relative, standard", HAND)
def test_hand_worked(mask, relative, standard):
    mask = np.asarray(mask, np.uint8)
    assert encode(mask) == relative
    assert encode(mask, "relative") == relative
    assert encode(mask, "standard") == standard
    np.testing.assert_array_equal(decode(relative, (4, 4)), mask)
    np.testing.assert_array_equal(decode(standard, (4, 4), "standard"), mask)


def test_non_square_pins_the_transpose():
    # H=3, W=5: (row 2, col 1) is flat 1*3+2 = 5; (row 0, col 4) is flat 12.
    mask = np.zeros((3, 5), np.uint8)
    mask[2, 1] = mask[0, 4] = 1
    assert encode(mask) == "5 1 6 1"
    assert encode(mask, "standard") == "6 1 13 1"
    np.testing.assert_array_equal(decode("5 1 6 1", (3, 5)), mask)
    np.testing.assert_array_equal(decode("6 1 13 1", (3, 5), "standard"), mask)
    # The same string on a 5x3 image: flat 5 -> (row 0, col 1), flat 12 -> (row 2, col 2).
    other = np.zeros((5, 3), np.uint8)
    other[0, 1] = other[2, 2] = 1
    np.testing.assert_array_equal(decode("5 1 6 1", (5, 3)), other)


@pytest.mark.parametrize("empty", ["-1", " -1", "-1 ", "", "   ", "\t\n"])
@pytest.mark.parametrize("fmt", FMTS)
def test_empty_strings(empty, fmt):
    out = decode(empty, (3, 5), fmt)
    assert out.shape == (3, 5) and out.dtype == np.uint8 and not out.any()


def test_decode_output_type_and_default_shape():
    out = decode("0 1 1048574 1")  # first and last pixel of a 1024x1024 image
    assert out.shape == (1024, 1024) and out.dtype == np.uint8
    assert out.flags.c_contiguous
    assert out[0, 0] == 1 and out[1023, 1023] == 1 and out.sum() == 2


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int32, np.float32])
def test_encode_any_dtype_nonzero_is_foreground(dtype):
    mask = np.zeros((4, 4), dtype)
    mask[1:3, 1:3] = 7 if dtype is not np.bool_ else True
    assert encode(mask) == "5 2 2 2"


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        encode(np.zeros((2, 4, 4)))


@pytest.mark.parametrize("call", [
    lambda: decode("1 1", (4, 4), "kaggle"),
    lambda: encode(np.ones((2, 2)), "kaggle"),
    lambda: decode_rows(["1 1"], (4, 4), "kaggle"),
])
def test_unknown_format_names_it(call):
    with pytest.raises(RLEError, match="'kaggle'"):
        call()


# --- against the reference on random masks ---------------------------------------------------

SHAPES = [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (5, 3), (16, 16), (31, 17), (64, 48)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FMTS)
def test_random_masks_match_reference(shape, fmt):
    rng = np.random.default_rng(hash((shape, fmt)) % 2**32)
    for density in (0.05, 0.3, 0.5, 0.9):
        for edges in range(4):  # bit 0: first pixel set, bit 1: last pixel set
            mask = (rng.random(shape) < density).astype(np.uint8)
            mask[0, 0] = edges & 1
            mask[-1, -1] = (edges >> 1) & 1
            rle = encode(mask, fmt)
            assert rle == ref_encode(mask, fmt)
            np.testing.assert_array_equal(decode(rle, shape, fmt), mask)
            np.testing.assert_array_equal(ref_decode(rle, shape, fmt), mask)


def test_full_and_empty_random_shapes():
    for shape in SHAPES:
        n = shape[0] * shape[1]
        assert encode(np.ones(shape)) == f"0 {n}"
        assert encode(np.ones(shape), "standard") == f"1 {n}"
        assert encode(np.zeros(shape)) == "-1"


# --- decode_rows -----------------------------------------------------------------------------


def test_decode_rows_union_of_overlapping_rows():
    a = square(slice(0, 3), slice(0, 2))
    b = square(slice(2, 4), slice(1, 4))
    for fmt in FMTS:
        rows = [encode(a, fmt), "-1", encode(b, fmt)]
        union = decode_rows(rows, (4, 4), fmt)
        assert union.dtype == np.uint8
        np.testing.assert_array_equal(union, np.maximum(a, b))
        # an oracle computed without the codec: the pixel count of the union
        assert union.sum() == 6 + 6 - 1


def test_decode_rows_empty_and_errors():
    assert not decode_rows([], (4, 4)).any()
    assert not decode_rows(["-1", " -1"], (4, 4)).any()
    with pytest.raises(RLEError, match=r"row 1: .*odd count"):
        decode_rows(["0 1", "0 1 2"], (4, 4))
    with pytest.raises(TypeError):
        decode_rows("0 1", (4, 4))


# --- malformed input -------------------------------------------------------------------------

MALFORMED = [
    ("1 2 3", "relative", (4, 4), "odd count of numbers (3)"),
    ("6 2 10", "standard", (4, 4), "odd count of numbers (3)"),
    ("1.5 2", "relative", (4, 4), "'1.5') is not a non-negative integer"),
    ("0 abc", "standard", (4, 4), "token 2 ('abc')"),
    ("0 1 2 1e3", "relative", (4, 4), "'1e3'"),
    ("-3 2", "relative", (4, 4), "token 1 is negative ('-3')"),
    ("5 -2", "standard", (4, 4), "token 2 is negative ('-2')"),
    ("-1 -1", "relative", (4, 4), "negative"),
    ("5 0", "relative", (4, 4), "run 1 (offset 5, length 0) has length < 1"),
    ("1 1 5 0", "standard", (4, 4), "run 2 (start 5, length 0) has length < 1"),
    ("0 2", "standard", (4, 4), "run 1 (start 0, length 2) has start < 1"),
    ("15 2", "relative", (4, 4), "ends past the 16 pixels of a 4x4 image"),
    ("16 2", "standard", (4, 4), "run 1 (start 16, length 2) ends past the 16 pixels"),
    ("17 1", "standard", (4, 4), "ends past"),
    ("16 1", "relative", (4, 4), "ends past"),
    ("0 1 20 1", "relative", (4, 4), "run 2 (offset 20, length 1) ends past"),
    ("0 5 5 5 5 5", "relative", (4, 4), "run 3 (offset 5 -> 0-based start 20, length 5) ends past"),
    ("1048570 20", "relative", (1024, 1024),
     "run 1 (offset 1048570 -> 0-based start 1048570, length 20) ends past the 1048576 pixels "
     "of a 1024x1024 image"),
    ("1 2 3 4 1048570 20", "standard", (1024, 1024),
     "run 3 (start 1048570, length 20) ends past the 1048576 pixels of a 1024x1024 image"),
    ("10 2 5 1", "standard", (4, 4), "run 2 (start 5, length 1) begins before run 1"),
    ("5 3 6 1", "standard", (4, 4), "run 2 (start 6, length 1) begins before run 1"),
    ("5 2 5 2", "standard", (4, 4), "must not overlap"),
    ("9" * 30 + " 1", "relative", (4, 4), "too large"),
    ("0 " + "9" * 19, "standard", (4, 4), "too large"),
    ("9223372036854775807 1", "relative", (4, 4), "too large"),
    ("999999999999999999 999999999999999999 " * 20, "relative", (4, 4), "ends past"),
    ("999999999999999999 999999999999999999 " * 20, "standard", (4, 4), "begins before"),
    ("5 2 2 2\x00", "relative", (4, 4), "not a non-negative integer"),
    ("5 ２", "relative", (4, 4), "not a non-negative integer"),  # full-width digit
]


@pytest.mark.parametrize("rle, fmt, shape, message", MALFORMED)
def test_malformed_raises_with_message(rle, fmt, shape, message):
    with pytest.raises(RLEError) as info:
        decode(rle, shape, fmt)
    text = str(info.value)
    assert message in text
    assert "\n" not in text and fmt in text
    assert isinstance(info.value, TfpneumoError)
    # the reference agrees that the string is malformed
    assert ref_decode(rle, shape, fmt) is None


def test_adjacent_runs_are_valid():
    # Touching runs are not overlapping: the decoder accepts them (the encoder would merge them).
    expected = square(slice(0, 4), slice(0, 1))
    np.testing.assert_array_equal(decode("0 2 0 2", (4, 4)), expected)
    np.testing.assert_array_equal(decode("1 2 3 2", (4, 4), "standard"), expected)


def test_non_string_is_rejected():
    with pytest.raises(RLEError, match="must be a string"):
        decode(float("nan"), (4, 4))  # type: ignore[arg-type]


# --- hypothesis ------------------------------------------------------------------------------

SMALL = (3, 5)


def _decode_or_rle_error(rle: str, fmt: str) -> np.ndarray | None:
    try:
        out = decode(rle, SMALL, fmt)
    except RLEError as err:
        assert str(err) and "\n" not in str(err)
        return None
    assert out.shape == SMALL and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 1}
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=-3, max_value=20), max_size=12), st.sampled_from(FMTS))
def test_hypothesis_integer_lists_match_reference(values, fmt):
    rle = " ".join(str(v) for v in values)
    out = _decode_or_rle_error(rle, fmt)
    expected = ref_decode(rle, SMALL, fmt)
    if expected is None:
        assert out is None, f"{rle!r} should be malformed"
    else:
        assert out is not None, f"{rle!r} should decode"
        np.testing.assert_array_equal(out, expected)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789 -.\t\nae+x\u00a0\u2003٣")), max_size=40)
       | st.text(max_size=40), st.sampled_from(FMTS))
def test_hypothesis_random_text_decodes_or_raises_rle_error(text, fmt):
    out = _decode_or_rle_error(text, fmt)
    expected = ref_decode(text, SMALL, fmt)
    assert (out is None) == (expected is None)
    if out is not None:
        np.testing.assert_array_equal(out, expected)


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
               elements=st.integers(0, 1)),
    st.sampled_from(FMTS),
)
def test_hypothesis_round_trip(mask, fmt):
    rle = encode(mask, fmt)
    assert rle == ref_encode(mask, fmt)
    np.testing.assert_array_equal(decode(rle, mask.shape, fmt), mask)


# --- real labels -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage2_labels(siim_dir) -> pd.DataFrame:
    frame = pd.read_csv(siim_dir / "stage_2_train.csv.gz", dtype=str, keep_default_na=False)
    frame.columns = [c.strip() for c in frame.columns]
    frame["EncodedPixels"] = frame["EncodedPixels"].str.strip()
    return frame


def test_real_labels_round_trip(stage2_labels):
    positive = stage2_labels[stage2_labels["EncodedPixels"] != "-1"]["EncodedPixels"].tolist()
    assert len(positive) == 3576
    for rle in positive:
        mask = decode(rle)
        assert mask.shape == (1024, 1024)
        lengths = [int(v) for v in rle.split()[1::2]]
        assert mask.sum() == sum(lengths) > 0  # the runs are disjoint and all painted
        assert encode(mask) == rle
    # A few against the pixel-loop reference (slow, so only some).
    for rle in positive[:: len(positive) // 2]:
        np.testing.assert_array_equal(decode(rle), ref_decode(rle, (1024, 1024), "relative"))


def test_real_labels_union_per_image(stage2_labels):
    multi = stage2_labels[stage2_labels["EncodedPixels"] != "-1"].groupby("ImageId")
    multi = [rows for _, rows in multi["EncodedPixels"] if len(rows) >= 3][:5]
    assert multi, "the stage-2 file has images with several annotation rows"
    for rows in multi:
        union = decode_rows(list(rows))
        separate = [decode(r) for r in rows]
        np.testing.assert_array_equal(union, np.maximum.reduce(separate))
        assert union.sum() >= max(m.sum() for m in separate)
