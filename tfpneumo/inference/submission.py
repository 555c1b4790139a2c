"""``tfpneumo submit``: the competition CSV from the trained folds, straight from test DICOMs.

Flow: the sample submission's ids (their order is the CSV's order) are matched to the DICOMs
of ``DATA/dicom-images-test`` (any depth); each image is decoded, resized to ``size`` and
normalised as the cache was (same resampling, CLAHE when the cache has it), predicted by the
ensemble (mean over folds, horizontal-flip TTA, optional multi-scale TTA), gated by the
thresholds of ``runs/<experiment>/evaluation.json`` (or given ones), resized back to the
DICOM's own size, thresholded and run-length encoded at once. Memory stays flat: one batch of
images and probability maps at a time, the next batch being read in a background thread.
The CSV is checked (ids equal the sample's, every RLE decodes to its image) before it replaces
``out`` atomically.

Shared with :mod:`tfpneumo.inference.pictures`: :func:`load_ensemble`, :func:`resolve_thresholds`,
:func:`load_image`, :func:`image_batches`, :func:`full_size_mask`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tfpneumo import TfpneumoError
from tfpneumo.config import Config
from tfpneumo.data import rle as rle_codec
from tfpneumo.data.dicom import find_dicoms, read_dicom
from tfpneumo.data.labels import check_id

__all__ = ["SubmitError", "Thresholds", "ensemble_files", "load_ensemble", "parse_folds",
           "read_sample_ids", "resolve_thresholds", "submit"]

WEIGHTS = ("auto", "best", "swa", "final", "topk")
SAMPLE_FILES = ("sample_submission.csv", "stage_2_sample_submission.csv")
NO_THRESHOLDS = "no thresholds: run tfpneumo evaluate or pass --top/--min-area/--bottom"
_MISSING_SHOWN = 5


class SubmitError(TfpneumoError):
    """Submission or prediction input is unusable (run folder, thresholds, sample, DICOMs)."""


# ----------------------------------------------------------------------------- runs and models

def run_root(cfg: Config, workdir: Path = Path(".")) -> Path:
    """``<workdir>/runs/<experiment>``."""
    return Path(workdir) / "runs" / cfg.experiment


def _manifest(cfg: Config) -> dict | None:
    """The cache's manifest.json, or None when there is no readable one."""
    path = Path(cfg.data.cache) / "manifest.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def trained_folds(cfg: Config, workdir: Path = Path(".")) -> list[int]:
    """Indices k of the run's ``fold_<k>`` folders holding result.json (training finished)."""
    root = run_root(cfg, workdir)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if (m := re.fullmatch(r"fold_(\d+)", p.name)) and (p / "result.json").is_file())


def parse_folds(folds: str | int | Sequence[int], cfg: Config,
                workdir: Path = Path(".")) -> list[int]:
    """``"all"``, ``"0,2"``, ``2`` or ``[0, 2]`` -> sorted unique fold indices.

    ``"all"`` is every trained fold (as in ``tfpneumo evaluate``); none raises.
    """
    if isinstance(folds, str):
        text = folds.strip()
        if text.lower() == "all":
            found = trained_folds(cfg, workdir)
            if not found:
                raise SubmitError(f"{run_root(cfg, workdir)}: no trained fold (no "
                                  "fold_<k>/result.json); run tfpneumo train first")
            return found
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise SubmitError(f"--folds {folds!r}: expected 'all' or fold indices like "
                              "0,1,2") from None
    elif isinstance(folds, int):
        values = [folds]
    else:
        values = [int(x) for x in folds]
    if not values or any(v < 0 for v in values):
        raise SubmitError(f"--folds {folds!r}: expected 'all' or fold indices >= 0")
    return sorted(set(values))


def untrained_note(cfg: Config, files: Sequence[Path]) -> str:
    """``"; note: folds 1,2 of the cache are not in the ensemble"`` or ``""``."""
    manifest = _manifest(cfg)
    n_folds = manifest.get("folds") if manifest else None
    if not isinstance(n_folds, int):
        return ""
    used = {int(p.parent.name.removeprefix("fold_")) for p in files}
    left = [k for k in range(n_folds) if k not in used]
    return f"; note: folds {','.join(map(str, left))} of the cache are not in the ensemble" \
        if left else ""


def ensemble_files(cfg: Config, workdir: Path = Path("."), folds: Any = "all",
                   weights: str = "auto") -> list[Path]:
    """The ``.keras`` file of each fold: ``runs/<experiment>/fold_<k>/<weights>.keras``.

    ``weights="auto"`` takes swa.keras if present, else best.keras, else final.keras.
    A fold without result.json (not trained, or training not finished) raises, naming it.
    """
    if weights not in WEIGHTS:
        raise SubmitError(f"--weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    files = []
    for k in parse_folds(folds, cfg, workdir):
        fold = run_root(cfg, workdir) / f"fold_{k}"
        if not (fold / "result.json").is_file():
            raise SubmitError(f"{fold / 'result.json'}: fold {k} is not trained (or its training "
                              f"did not finish); run tfpneumo train --fold {k} or pass --folds")
        if weights == "auto":
            names = ("swa.keras", "best.keras", "final.keras")
            path = next((fold / n for n in names if (fold / n).is_file()), fold / "final.keras")
        else:
            path = fold / f"{weights}.keras"
        if not path.is_file():
            raise SubmitError(f"{path}: model file not found (try --weights auto)")
        files.append(path)
    return files


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def load_model_file(path: Path):
    """One saved network (safe_mode) whose outputs include ``mask`` and ``label``."""
    import keras

    # Registers the custom layers for loading. unet.py imports layers.py only inside
    # build_model, so importing unet alone does not register BilinearUpSampling2D.
    import tfpneumo.models.layers  # noqa: F401
    import tfpneumo.models.unet  # noqa: F401

    try:
        net = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # keras raises many types for a bad zip, config or weights file
        raise SubmitError(f"{path}: cannot load model ({_first_line(e)})") from e
    outputs = net.output if isinstance(net.output, dict) else {}
    if not {"mask", "label"} <= set(outputs):
        raise SubmitError(f"{path}: not a tfpneumo UNet (outputs must include 'mask' and 'label')")
    return net


def load_ensemble(cfg: Config, workdir: Path = Path("."), folds: Any = "all",
                  weights: str = "auto") -> list:
    """The networks of :func:`ensemble_files`, loaded: ``list[keras.Model]``."""
    return [load_model_file(p) for p in ensemble_files(cfg, workdir, folds, weights)]


# ----------------------------------------------------------------------------- thresholds

@dataclass(frozen=True)
class Thresholds:
    """How a probability map becomes a mask (see :func:`tfpneumo.inference.ensemble.keep_prediction`).

    ``min_area`` is in pixels at the prediction size.
    """

    rule: str
    bottom: float
    top: float | None = None
    min_area: int = 0
    label_threshold: float | None = None

    def describe(self) -> str:
        if self.rule == "triplet":
            return f"triplet top={self.top:g} min_area={self.min_area} bottom={self.bottom:g}"
        if self.rule == "label":
            return (f"label p>{self.label_threshold:g} bottom={self.bottom:g} "
                    f"min_area={self.min_area}")
        return f"pixel bottom={self.bottom:g} min_area={self.min_area}"

    def keep(self, prob: np.ndarray, label_prob: float) -> bool:
        from tfpneumo.inference.ensemble import keep_prediction

        return keep_prediction(prob, label_prob, self.rule, bottom=self.bottom, top=self.top,
                               min_area=self.min_area, label_threshold=self.label_threshold)


_THRESHOLD_KEYS = ("rule", "top", "min_area", "bottom", "label_threshold")
_FLAGS = {"top": "--top", "min_area": "--min-area", "bottom": "--bottom",
          "label_threshold": "--label-threshold", "rule": "--rule"}
_NEEDS = {"triplet": ("top", "min_area", "bottom"), "label": ("label_threshold", "bottom"),
          "pixel": ("bottom",)}


def _read_evaluation(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SubmitError(f"{path}: cannot read ({e.strerror or e})") from e
    except ValueError as e:
        raise SubmitError(f"{path}: not valid JSON ({_first_line(e)})") from e
    best = data.get("best") if isinstance(data, dict) else None
    if not isinstance(best, dict):
        raise SubmitError(f"{path}: no 'best' entry; rerun tfpneumo evaluate")
    return best


def resolve_thresholds(cfg: Config, workdir: Path = Path("."),
                       overrides: dict[str, Any] | None = None,
                       size: int | None = None) -> tuple[Thresholds, str]:
    """The thresholds to apply and where they came from (``"evaluation.json"``, ``"options"``,
    or both).

    Base: ``best`` of ``runs/<experiment>/evaluation.json`` when present; its ``min_area``
    (pixels at the cached size, ``best.pixels`` or the cache manifest) is rescaled to the
    prediction ``size`` as ``round(min_area_fraction * size**2)`` when the sizes differ.
    ``overrides`` (keys rule, top, min_area, bottom, label_threshold; None = not given)
    replace single values; an overriding ``min_area`` is in pixels at ``size``. Without
    evaluation.json the rule is ``overrides["rule"]``, else triplet when top is given, label
    when label_threshold is, else pixel.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(_THRESHOLD_KEYS)
    if unknown:
        raise SubmitError(f"unknown threshold option(s) {sorted(unknown)}; "
                          f"expected {list(_THRESHOLD_KEYS)}")
    path = run_root(cfg, workdir) / "evaluation.json"
    base: dict[str, Any] = {}
    if path.is_file():
        best = _read_evaluation(path)
        base = {k: best.get(k) for k in _THRESHOLD_KEYS if best.get(k) is not None}
        fraction = best.get("min_area_fraction")
        pixels = best.get("pixels")  # of the cached images the rule was searched on
        if pixels is None:
            manifest = _manifest(cfg)
            cached = manifest.get("size") if manifest else None
            pixels = cached * cached if isinstance(cached, int) else None
        if size is not None and fraction is not None and size * size != pixels:
            try:
                base["min_area"] = int(round(float(fraction) * size * size))
            except (TypeError, ValueError):
                raise SubmitError(f"{path}: best.min_area_fraction {fraction!r} is not a "
                                  "number") from None
    elif not overrides:
        raise SubmitError(NO_THRESHOLDS)
    merged = {**base, **overrides}
    if "rule" not in merged:
        merged["rule"] = ("triplet" if "top" in merged else
                          "label" if "label_threshold" in merged else "pixel")
    rule = merged["rule"]
    from tfpneumo.inference.ensemble import RULES

    if rule not in RULES:
        raise SubmitError(f"rule {rule!r}: expected one of {', '.join(RULES)}")
    missing = [_FLAGS[k] for k in _NEEDS[rule] if k not in merged]
    if missing:
        raise SubmitError(f"{NO_THRESHOLDS} (the {rule} rule is missing {', '.join(missing)})")
    try:
        values = {k: float(merged[k]) for k in ("top", "bottom", "label_threshold") if k in merged}
        min_area = merged.get("min_area", 0)
        if isinstance(min_area, float) and not min_area.is_integer():
            raise ValueError
        min_area = int(min_area)
    except (TypeError, ValueError):
        raise SubmitError(f"thresholds {merged}: top, bottom and label_threshold must be "
                          "numbers, min_area an integer") from None
    for key, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise SubmitError(f"threshold {key}={value:g} (from {_FLAGS[key]} or {path.name}): "
                              "must be in [0, 1]")
    if min_area < 0:
        raise SubmitError(f"min_area={min_area}: must be >= 0")
    thresholds = Thresholds(rule=rule, bottom=values["bottom"], top=values.get("top"),
                            min_area=min_area, label_threshold=values.get("label_threshold"))
    source = ("evaluation.json" if base and not overrides else
              "options" if not base else "evaluation.json + options")
    return thresholds, source


# ----------------------------------------------------------------------------- images

def check_size(size: int) -> None:
    if size < 32 or size % 32:
        raise SubmitError(f"--size {size}: must be a multiple of 32 (the UNet downsamples 5 "
                          "times), e.g. 512 or 1024")


def check_scales(scales: str | Iterable[float]) -> tuple[float, ...]:
    """TTA scales as floats: a sequence or the CLI's text ``"1.0,0.75,1.25"``."""
    text = scales if isinstance(scales, str) else ",".join(map(str, scales))
    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        values = ()
    if not values or any(not math.isfinite(s) or s <= 0 for s in values):
        raise SubmitError(f"--scales {text!r}: expected positive scales like 1.0,0.75,1.25")
    return values


def cache_clahe(cfg: Config) -> bool:
    """Whether the cache the models were trained on applied CLAHE (its manifest, else the
    config)."""
    manifest = _manifest(cfg)
    if manifest is not None and "clahe" in manifest:
        return bool(manifest["clahe"])
    return bool(cfg.prepare.clahe)


def load_image(path: Path, size: int, clahe: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One DICOM as the network sees it: ``(size, size) uint8`` (resampled like the cache) and
    its original ``(H, W) uint8`` pixels. Raises DicomError naming the file."""
    from tfpneumo.data.prepare import resize_image

    pixels, _ = read_dicom(path)
    if pixels.shape == (size, size):
        image = pixels
    elif pixels.shape[0] == pixels.shape[1]:
        image = resize_image(pixels, size)
    else:  # not SIIM (square) data: squash, as the network only takes square inputs here
        import cv2

        interp = cv2.INTER_AREA if size < min(pixels.shape) else cv2.INTER_LINEAR
        image = cv2.resize(pixels, (size, size), interpolation=interp)
    if clahe:
        import cv2

        image = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(image)
    return image, pixels


@dataclass
class Batch:
    """``ids`` (B,), ``images`` (B, size, size) uint8, ``originals`` B arrays (H, W) uint8."""

    ids: list[str]
    images: np.ndarray
    originals: list[np.ndarray]


def image_batches(items: Sequence[tuple[str, Path]], size: int, batch_size: int,
                  clahe: bool = False) -> Iterator[Batch]:
    """Batches of decoded images in the order of ``items`` (id, path); the next batch is read
    in a background thread while the caller predicts the current one (at most two batches
    in memory)."""

    def load(chunk: Sequence[tuple[str, Path]]) -> Batch:
        loaded = [load_image(path, size, clahe) for _, path in chunk]
        return Batch([image_id for image_id, _ in chunk], np.stack([a for a, _ in loaded]),
                     [b for _, b in loaded])

    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, chunks[0])
        for k in range(len(chunks)):
            batch = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(load, chunks[k + 1])
            yield batch


def full_size_mask(prob: np.ndarray, label_prob: float, shape: tuple[int, int],
                   thresholds: Thresholds) -> np.ndarray:
    """(size, size) float32 probabilities -> (H, W) bool mask at the image's own size.

    The gate is decided at the prediction size (where ``min_area`` is given); a kept map is
    resized back (bilinear) before ``prob >= bottom``, so edges are smooth, not blocky.
    """
    if not thresholds.keep(prob, label_prob):
        return np.zeros(shape, dtype=bool)
    return full_size_prob(prob, shape) >= thresholds.bottom


def full_size_prob(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 probabilities resized (bilinear) to ``shape`` (H, W)."""
    if prob.shape == tuple(shape):
        return prob
    import cv2

    return cv2.resize(prob, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def default_batch_size(cfg: Config, size: int) -> int:
    """The training batch size scaled to the prediction size (same pixels per batch)."""
    return max(1, int(cfg.data.batch_size * (cfg.data.image_size / size) ** 2))


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
        raise SubmitError(f"{path}: not a readable CSV ({_first_line(e)})") from e
    except OSError as e:
        raise SubmitError(f"{path}: cannot read ({e.strerror or e})") from e
    if not ids:
        raise SubmitError(f"{path}: no ImageId rows")
    return ids


def resolve_data(cfg: Config, data: Path | None) -> Path:
    """``data``, or the data folder recorded in the cache manifest; it must hold
    dicom-images-test/."""
    if data is None:
        manifest = _manifest(cfg)
        if manifest is None or not manifest.get("data_dir"):
            raise SubmitError(f"{Path(cfg.data.cache) / 'manifest.json'}: no prepared cache to "
                              "take the data folder from; pass --data")
        data = Path(manifest["data_dir"])
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


def match_test_files(ids: Sequence[str], test_dir: Path) -> list[tuple[str, Path]]:
    """(id, DICOM path) for every sample id, in sample order; missing DICOMs raise, naming
    the first few."""
    files = find_dicoms(test_dir)
    if not files:
        raise SubmitError(f"{test_dir}: no .dcm files")
    missing = [i for i in ids if i not in files]
    if missing:
        shown = ", ".join(missing[:_MISSING_SHOWN]) + (", ..." if len(missing) > _MISSING_SHOWN
                                                       else "")
        raise SubmitError(f"{test_dir}: no DICOM for {len(missing)} of {len(ids)} sample "
                          f"submission ids ({shown})")
    return [(i, files[i]) for i in ids]


# ----------------------------------------------------------------------------- submit

def check_inference_options(cfg: Config, size: int, scales, batch_size: int | None
                            ) -> tuple[tuple[float, ...], int]:
    """Validates --size, --scales and --batch-size of submit and predict; returns the parsed
    scales and the batch size (default: :func:`default_batch_size`)."""
    check_size(size)
    scales = check_scales(scales)
    if batch_size is not None and batch_size < 1:
        raise SubmitError(f"--batch-size {batch_size}: must be >= 1")
    return scales, batch_size or default_batch_size(cfg, size)


def submit(cfg: Config, *, out: Path = Path("submission.csv"), rle: str = "relative",
           sample_submission: Path | None = None, data: Path | None = None,
           folds: Any = "all", weights: str = "auto",
           thresholds: dict[str, Any] | None = None, size: int = 1024,
           batch_size: int | None = None, hflip: bool = True,
           scales: str | Sequence[float] = (1.0,), workdir: Path = Path("."),
           progress: bool = True) -> str:
    """Writes the submission CSV ``ImageId,EncodedPixels`` and returns a one-line summary.

    Every id of the sample submission appears once, in its order; ``-1`` for an empty mask,
    else ``rle.encode(mask, fmt=rle)`` of the mask at the DICOM's own size. ``thresholds``
    overrides single values (see :func:`resolve_thresholds`). ``batch_size`` None: the
    training batch scaled to ``size`` (:func:`default_batch_size`). ``scales``: multi-scale
    TTA, e.g. ``(1.0, 0.75, 1.25)`` or ``"1,0.75,1.25"``. Same inputs, same bytes.

    A test DICOM that cannot be decoded stops the run (DicomError naming it): a submission
    must hold every id, and a silent ``-1`` would hide the problem.
    """
    start = time.perf_counter()
    if rle not in rle_codec.FORMATS:
        raise SubmitError(f"--rle {rle!r}: expected one of {', '.join(rle_codec.FORMATS)}")
    scales, batch_size = check_inference_options(cfg, size, scales, batch_size)
    out = Path(out)
    data = resolve_data(cfg, data)
    sample = resolve_sample(data, sample_submission)
    ids = read_sample_ids(sample)
    test_dir = data / "dicom-images-test"
    items = match_test_files(ids, test_dir)
    rule, source = resolve_thresholds(cfg, workdir, thresholds, size)
    files = ensemble_files(cfg, workdir, folds, weights)
    nets = [load_model_file(p) for p in files]

    from tfpneumo.data.pipeline import normalize
    from tfpneumo.data.prepare import Progress
    from tfpneumo.inference.ensemble import ensemble_predictor

    predictor = ensemble_predictor(nets, hflip=hflip, scales=scales)
    bar = Progress(f"submit {out}", len(items), progress)
    tmp = out.with_name(out.name + ".tmp")
    shapes: dict[str, tuple[int, int]] = {}
    positives = 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["ImageId", "EncodedPixels"])
            for batch in image_batches(items, size, batch_size, cache_clahe(cfg)):
                probs, labels = predictor(normalize(batch.images[..., None]))
                probs, labels = probs.numpy()[..., 0], labels.numpy()
                for i, image_id in enumerate(batch.ids):
                    shape = batch.originals[i].shape
                    mask = full_size_mask(probs[i], float(labels[i]), shape, rule)
                    text = rle_codec.encode(mask, fmt=rle)
                    # The check costs ~1 ms: a wrong string must never reach the file.
                    if not np.array_equal(rle_codec.decode(text, shape, rle), mask):
                        raise SubmitError(f"{image_id}: RLE round trip failed (internal error)")
                    positives += text != "-1"
                    writer.writerow([image_id, text])
                    shapes[image_id] = shape
                bar.update(len(batch.ids))
        bar.close()
        _check_csv(tmp, ids, rle, shapes)
        os.replace(tmp, out)
    except OSError as e:
        raise SubmitError(f"{e.filename or out}: cannot write ({e.strerror or e})") from e
    finally:
        # Best effort: when out's folder could not be made, unlinking raises NotADirectoryError,
        # which would replace the one-line SubmitError above with a traceback.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    tta = "hflip" if hflip else "no flip"
    if scales != (1.0,):
        tta += f", scales {','.join(f'{s:g}' for s in scales)}"
    return (f"wrote {out}: {len(ids)} images, {positives} with a mask "
            f"({100.0 * positives / len(ids):.1f}%), {rle} RLE; ensemble of {len(nets)} "
            f"fold(s) ({', '.join(p.parent.name + '/' + p.name for p in files)}), {tta}, "
            f"size {size}; thresholds {rule.describe()} ({source}); "
            f"{time.perf_counter() - start:.1f} s{untrained_note(cfg, files)}")


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

