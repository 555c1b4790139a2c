"""``tfpneumo submit``: the competition CSV from the trained folds, straight from test DICOMs.

Flow: the sample submission's ids (their order is the CSV's order) are matched to the DICOMs
of ``DATA/dicom-images-test`` (any depth); the fold ensemble
(:func:`tfpneumo.inference.ensemble.predictor`: flip and multi-scale TTA, images decoded as
the cache was) predicts them, the decision rule of ``evaluate``
(:mod:`tfpneumo.evaluation.rules`) turns each map into a mask at the DICOM's own size, and the
mask is run-length encoded at once. Memory stays flat: one batch at a time. The CSV is
checked (ids equal the sample's, every RLE decodes to its image) before it replaces ``out``
atomically.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tfpneumo import runs
from tfpneumo.config import Config
from tfpneumo.data import rle as rle_codec
from tfpneumo.data.dicom import find_dicoms, read_header
from tfpneumo.data.labels import check_id
from tfpneumo.data.manifest import MANIFEST, find_cache_info
from tfpneumo.errors import TfpneumoError, first_line
from tfpneumo.evaluation.rules import resolve_rule
from tfpneumo.files import atomic_path
from tfpneumo.inference.ensemble import check_options, predictor, untrained_note
from tfpneumo.progress import Progress

SAMPLE_FILES = ("sample_submission.csv", "stage_2_sample_submission.csv")
_MISSING_SHOWN = 5


class SubmitError(TfpneumoError):
    """Submission input is unusable (data folder, sample submission, test DICOMs)."""


# ----------------------------------------------------------------------------- sample submission

def read_sample_ids(path: Path) -> list[str]:
    """The ImageIds of a sample submission, in file order (BOM and ``ImageId, EncodedPixels``
    header quirks accepted). Duplicates, bad ids and a file without ids raise naming the row."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if "ImageId" not in header:
                raise SubmitError(f"{path}: row 1: no ImageId column (header is "
                                  f"{','.join(header)!r})")
            col = header.index("ImageId")
            ids: list[str] = []
            seen: dict[str, int] = {}
            for fields in reader:
                if not fields or all(not x.strip() for x in fields):
                    continue
                line = reader.line_num
                image_id = fields[col].strip() if col < len(fields) else ""
                reason = check_id(image_id)
                if reason is not None:
                    raise SubmitError(f"{path}: row {line}: {reason}")
                if image_id in seen:
                    raise SubmitError(f"{path}: row {line}: ImageId {image_id} appears twice "
                                      f"(first in row {seen[image_id]})")
                seen[image_id] = line
                ids.append(image_id)
    except FileNotFoundError as e:
        raise SubmitError(f"{path}: sample submission not found") from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise SubmitError(f"{path}: not a readable CSV ({first_line(e)})") from e
    except OSError as e:
        raise SubmitError(f"{path}: cannot read ({e.strerror or e})") from e
    if not ids:
        raise SubmitError(f"{path}: no ImageId rows")
    return ids


def resolve_data(cfg: Config, data: Path | None) -> Path:
    """``data``, or the data folder recorded in the cache manifest; it must hold
    dicom-images-test/."""
    if data is None:
        cache = find_cache_info(cfg.data.cache)
        if cache is None or cache.data_dir is None:
            raise SubmitError(f"{Path(cfg.data.cache) / MANIFEST}: no prepared cache to "
                              "take the data folder from; pass --data")
        data = cache.data_dir
        where = f" (the data folder of the cache {cfg.data.cache}; pass --data to change it)"
    else:
        where = ""
    data = Path(data)
    if not data.is_dir():
        raise SubmitError(f"{data}: data folder not found{where}")
    if not (data / "dicom-images-test").is_dir():
        raise SubmitError(f"{data}: no dicom-images-test/ folder{where}")
    return data


def resolve_sample(data: Path, sample: Path | None) -> Path:
    if sample is not None:
        return Path(sample)
    for name in SAMPLE_FILES:
        if (data / name).is_file():
            return data / name
    raise SubmitError(f"{data}: no sample submission ({' or '.join(SAMPLE_FILES)}); "
                      "pass --sample-submission")


def match_test_files(ids: Sequence[str], test_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(id, DICOM path) for every sample id, in sample order, and the ids of the test DICOMs
    that the sample does not ask for (sorted); missing DICOMs raise, naming the first few."""
    files = find_dicoms(test_dir)
    if not files:
        raise SubmitError(f"{test_dir}: no .dcm files")
    missing = [i for i in ids if i not in files]
    if missing:
        shown = ", ".join(missing[:_MISSING_SHOWN]) + (", ..." if len(missing) > _MISSING_SHOWN
                                                       else "")
        raise SubmitError(f"{test_dir}: no DICOM for {len(missing)} of {len(ids)} sample "
                          f"submission ids ({shown})")
    wanted = set(ids)
    return [(i, files[i]) for i in ids], sorted(i for i in files if i not in wanted)


def unrequested_note(extra: Sequence[str], test_dir: Path) -> str:
    """``"; note: 3 test DICOMs in <dir> are not in the sample submission ..."`` or ``""``."""
    if not extra:
        return ""
    shown = ", ".join(extra[:_MISSING_SHOWN]) + (", ..." if len(extra) > _MISSING_SHOWN else "")
    return (f"; note: {len(extra)} test DICOM(s) in {test_dir} are not in the sample submission "
            f"and were not predicted ({shown})")


# ----------------------------------------------------------------------------- submit

def submit(cfg: Config, *, out: Path = Path("submission.csv"), rle: str = "relative",
           sample_submission: Path | None = None, data: Path | None = None,
           folds: runs.FoldSpec = "all", weights: str = "auto",
           rule: dict[str, Any] | None = None, size: int = 1024,
           batch_size: int | None = None, hflip: bool = True,
           scales: Sequence[float] = (1.0,), workdir: Path = Path("."),
           progress: bool = True, precision: str = "float32") -> str:
    """Writes the submission CSV ``ImageId,EncodedPixels`` and returns a one-line summary.

    Every id of the sample submission appears once, in its order; ``-1`` for an empty mask,
    else ``rle.encode(mask, fmt=rle)`` of the mask at the DICOM's own size. ``rule``
    overrides single values of evaluate's rule (see
    :func:`tfpneumo.evaluation.rules.resolve_rule`); the other options are those of
    :func:`tfpneumo.inference.ensemble.predictor`. Same inputs, same bytes.

    A test DICOM that cannot be decoded stops the run (DicomError naming it): a submission
    must hold every id, and a silent ``-1`` would hide the problem.
    """
    start = time.perf_counter()
    if rle not in rle_codec.FORMATS:
        raise SubmitError(f"--rle {rle!r}: expected one of {', '.join(rle_codec.FORMATS)}")
    check_options(size, batch_size, scales, precision)
    out = Path(out)
    data = resolve_data(cfg, data)
    sample = resolve_sample(data, sample_submission)
    ids = read_sample_ids(sample)
    items, extra = match_test_files(ids, data / "dicom-images-test")
    for _, path in items:  # ~1 ms each: an unreadable or too large DICOM fails before any model loads
        read_header(path, cfg.data.max_dicom_mib)
    decision, source = resolve_rule(cfg.experiment, workdir, rule, size * size, weights)
    ensemble = predictor(cfg, folds=folds, weights=weights, size=size, batch_size=batch_size,
                         hflip=hflip, scales=scales, workdir=workdir, merge=decision.merge,
                         precision=precision)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SubmitError(f"{e.filename or out}: cannot write ({e.strerror or e})") from e
    # Two submits to one file would write the same temporary file at once.
    with runs.locked(out.with_name(f"{out.name}.lock"), "submit"):
        positives = _write_submission(out, ids, items, ensemble, decision, rle, progress)
    return (f"wrote {out}: {len(ids)} images, {positives} with a mask "
            f"({100.0 * positives / len(ids):.1f}%), {rle} RLE; {ensemble.describe()}; "
            f"thresholds {decision.describe()} ({source}); "
            f"{time.perf_counter() - start:.1f} s{untrained_note(cfg, ensemble.files)}"
            f"{unrequested_note(extra, data / 'dicom-images-test')}")


def _write_submission(out: Path, ids: Sequence[str], items, ensemble, decision, rle: str,
                      progress: bool) -> int:
    """Writes the CSV through a temporary file and checks it; returns the positive count."""
    bar = Progress(f"submit {out}", len(items), progress)
    shapes: dict[str, tuple[int, int]] = {}
    positives = 0
    try:
        with atomic_path(out) as tmp:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["ImageId", "EncodedPixels"])
                for p in ensemble.predict(items):
                    shape = p.original.shape
                    mask = decision.mask(p.prob, p.label_prob, shape)
                    text = rle_codec.encode(mask, fmt=rle)
                    # The check costs ~1 ms: a wrong string must never reach the file.
                    if not np.array_equal(rle_codec.decode(text, shape, rle), mask):
                        raise SubmitError(f"{p.image_id}: RLE round trip failed (internal error)")
                    positives += text != "-1"
                    writer.writerow([p.image_id, text])
                    shapes[p.image_id] = shape
                    bar.update(1)
            bar.close()
            _check_csv(tmp, ids, rle, shapes)
    except OSError as e:
        raise SubmitError(f"{e.filename or out}: cannot write ({e.strerror or e})") from e
    return positives


def _check_csv(path: Path, ids: Sequence[str], fmt: str,
               shapes: dict[str, tuple[int, int]]) -> None:
    """Re-reads the written CSV: header, ids equal to the sample's in order, every RLE
    decoding inside its image's (H, W)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if rows[:1] != [["ImageId", "EncodedPixels"]]:
        raise SubmitError(f"{path}: bad header {rows[:1]} (internal error)")
    got = [row[0] for row in rows[1:]]
    if got != list(ids):
        raise SubmitError(f"{path}: ids differ from the sample submission (internal error)")
    for image_id, text in rows[1:]:
        if text == "-1":
            continue
        try:
            rle_codec.decode(text, shapes[image_id], fmt)
        except rle_codec.RLEError as e:
            raise SubmitError(f"{path}: {image_id}: {e} (internal error)") from e

