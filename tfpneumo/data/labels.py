"""Reading SIIM label CSVs (``ImageId, EncodedPixels``) into image id -> RLE rows.

The real files have quirks this reader accepts: a header with a leading space
(``ImageId, EncodedPixels``), a UTF-8 BOM, gzip compression (``.csv.gz``), the values
``-1`` and `` -1`` (or a blank field) for an empty mask, several rows per image (their union
is the mask) and stage-2 ids like ``ID_0011fe81e``. Row numbers in messages are the 1-based
line numbers an editor shows (the header is line 1).

RLE strings are only checked for syntax here (non-negative integers in pairs); whether their
runs fit inside the image can only be checked once the DICOM's size is known, in prepare.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass, field
from pathlib import Path

from tfpneumo.errors import TfpneumoError, first_line

LABEL_FILES = ("train-rle.csv", "stage_2_train.csv", "train-rle.csv.gz", "stage_2_train.csv.gz")
EMPTY = "-1"


class LabelError(TfpneumoError):
    """A label CSV is missing, unreadable or has an invalid row."""


@dataclass(frozen=True)
class LabelRow:
    """One CSV row: ``rle`` is the stripped RLE string, ``""`` for a ``-1`` (empty) row."""

    image_id: str
    rle: str
    line: int


@dataclass
class LabelTable:
    """A parsed label CSV.

    ``rows`` maps each valid image id to its rows in file order. ``problems`` lists
    ``(image_id, line, reason)`` for rows that make their image unusable (malformed RLE, a
    ``-1`` row next to a positive row, an id that could be a path); such images are left
    out of ``rows`` entirely so that no partial mask is ever built from them.
    """

    path: Path
    rows: dict[str, list[LabelRow]] = field(default_factory=dict)
    problems: list[tuple[str, int, str]] = field(default_factory=list)

    def rles(self, image_id: str) -> list[str]:
        """The non-empty RLE strings of ``image_id`` (``[]`` for a negative image)."""
        return [row.rle for row in self.rows[image_id] if row.rle]


def check_id(image_id: str) -> str | None:
    """Why ``image_id`` is unusable as an image id, or None when it is fine.

    Ids only ever end up inside records, but an id that looks like a path is refused anyway
    so that no later tool can be tricked into writing outside its folder.
    """
    if not image_id:
        return "empty ImageId"
    if "/" in image_id or "\\" in image_id or ".." in image_id or "\x00" in image_id:
        return f"ImageId {image_id!r} contains '/', '\\', '..' or NUL"
    return None


def check_rle_syntax(rle: str) -> str | None:
    """Why ``rle`` is not a syntactically valid RLE string, or None when it is.

    Valid: pairs of whitespace-separated non-negative integers, every length >= 1 (the rules
    of :mod:`tfpneumo.data.rle`, checked without knowing the image size).
    """
    tokens = rle.split()
    for token in tokens:
        if not (token.isascii() and token.isdigit()):
            return f"malformed RLE: {token[:20]!r} is not a non-negative integer"
    if len(tokens) % 2:
        return f"malformed RLE: odd number of values ({len(tokens)})"
    if any(int(length) == 0 for length in tokens[1::2]):
        return "malformed RLE: a run of length 0"
    return None


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig drops the BOM of Kaggle's sample files; newline="" is what csv wants.
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def read_label_table(path: str | Path) -> LabelTable:
    """Parses a label CSV, collecting per-row problems instead of raising on them.

    Raises :class:`LabelError` for problems with the whole file: unreadable, not UTF-8 /
    not gzip, no ``ImageId`` / ``EncodedPixels`` columns, a row with too few fields.
    """
    path = Path(path)
    table = LabelTable(path=path)
    bad: dict[str, tuple[int, str]] = {}
    kinds: dict[str, tuple[int, int | None]] = {}  # id -> (first -1 line, first positive line)
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise LabelError(f"{path}: empty file, expected a header ImageId,EncodedPixels")
            names = [h.strip() for h in header]
            missing = [c for c in ("ImageId", "EncodedPixels") if c not in names]
            if missing:
                raise LabelError(f"{path}: row 1: missing column(s) {', '.join(missing)} "
                                 f"(header is {','.join(names)!r})")
            i_id, i_rle = names.index("ImageId"), names.index("EncodedPixels")
            need = max(i_id, i_rle) + 1
            for fields in reader:
                line = reader.line_num
                if not fields or all(not x.strip() for x in fields):
                    continue  # blank line
                if len(fields) < need:
                    raise LabelError(f"{path}: row {line}: expected ImageId,EncodedPixels, "
                                     f"got {len(fields)} field(s)")
                image_id, rle = fields[i_id].strip(), fields[i_rle].strip()
                if not rle:
                    rle = EMPTY  # a blank field is an empty mask, as rle.decode reads it
                reason = check_id(image_id)
                if reason is None and rle != EMPTY:
                    reason = check_rle_syntax(rle)
                if reason is None:
                    neg, pos = kinds.get(image_id, (None, None))
                    if rle == EMPTY:
                        neg = line if neg is None else neg
                    else:
                        pos = line if pos is None else pos
                    kinds[image_id] = (neg, pos)
                    if neg is not None and pos is not None:
                        reason = (f"ImageId {image_id} has both a -1 row (row {neg}) and an "
                                  f"RLE row (row {pos})")
                if reason is not None:
                    table.problems.append((image_id, line, reason))
                    bad.setdefault(image_id, (line, reason))
                    table.rows.pop(image_id, None)
                    continue
                if image_id not in bad:
                    table.rows.setdefault(image_id, []).append(
                        LabelRow(image_id, "" if rle == EMPTY else rle, line))
    except LabelError:
        raise
    except FileNotFoundError as e:
        raise LabelError(f"{path}: label file not found") from e
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, csv.Error) as e:
        raise LabelError(f"{path}: not a readable CSV ({first_line(e)})") from e
    except OSError as e:
        raise LabelError(f"{path}: cannot read ({e.strerror or e})") from e
    return table


def read_labels(path: str | Path) -> dict[str, list[str]]:
    """Image id -> its RLE strings (stripped; ``[]`` for an image whose row is ``-1``).

    Strict: the first invalid row raises :class:`LabelError` naming the file and row.
    """
    table = read_label_table(path)
    if table.problems:
        _, line, reason = min(table.problems, key=lambda p: p[1])
        raise LabelError(f"{table.path}: row {line}: {reason}")
    return {image_id: table.rles(image_id) for image_id in table.rows}


def find_labels(data_dir: str | Path) -> Path:
    """The label CSV of a SIIM folder: train-rle.csv, stage_2_train.csv or their .gz."""
    data_dir = Path(data_dir)
    for name in LABEL_FILES:
        if (data_dir / name).is_file():
            return data_dir / name
    raise LabelError(f"{data_dir}: no label CSV found (looked for {', '.join(LABEL_FILES)}); "
                     "pass --labels")
