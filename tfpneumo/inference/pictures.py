"""``tfpneumo predict``: pictures of the ensemble's prediction for a few DICOMs.

For each file ``<id>.dcm`` three PNGs at the DICOM's own size go into ``out``:

``<id>_prob.png``     mask probability as 8-bit grey (0..255 = 0..1)
``<id>_mask.png``     the thresholded, gated mask (0 / 255), exactly what ``submit`` encodes
``<id>_overlay.png``  the radiograph in grey, the mask tinted red (semi-transparent) with a
                      2-px outline, and "pneumothorax p=0.87" (the label probability)

Models, TTA and thresholds are those of :mod:`tfpneumo.inference.submission`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tfpneumo.config import Config
from tfpneumo.data.dicom import read_header
from tfpneumo.data.labels import check_id
from tfpneumo.inference.submission import (
    SubmitError,
    cache_clahe,
    check_inference_options,
    ensemble_files,
    full_size_prob,
    image_batches,
    load_model_file,
    resolve_thresholds,
)

TINT = (255, 0, 0)
TINT_ALPHA = 0.35
OUTLINE = (255, 40, 40)


def outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool mask -> (H, W) bool boundary, 2 px wide (one inside, one outside): the
    morphological gradient (dilation minus erosion) with a 3x3 cross."""
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, kernel) > 0


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def overlay(image: np.ndarray, mask: np.ndarray, label_prob: float) -> np.ndarray:
    """The radiograph with the prediction drawn on it.

    image (H, W) uint8 grey, mask (H, W) bool -> (H, W, 3) uint8 RGB: mask pixels blended
    with red (alpha :data:`TINT_ALPHA`), its outline solid, and the text
    ``pneumothorax p=0.87`` on a dark box in the top-left corner (font ~1/32 of the height).
    """
    from PIL import Image, ImageDraw

    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    tint = np.array(TINT, np.float32)
    rgb[mask] = (1.0 - TINT_ALPHA) * rgb[mask] + TINT_ALPHA * tint
    rgb[outline(mask)] = OUTLINE
    picture = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    height = image.shape[0]
    font = _font(max(12, height // 32))
    text = f"pneumothorax p={label_prob:.2f}"
    draw = ImageDraw.Draw(picture, "RGBA")
    margin = max(4, height // 128)
    left, top, right, bottom = draw.textbbox((2 * margin, 2 * margin), text, font=font)
    draw.rectangle([left - margin, top - margin, right + margin, bottom + margin],
                   fill=(0, 0, 0, 170))
    draw.text((2 * margin, 2 * margin), text, fill=(255, 255, 255, 255), font=font)
    return np.asarray(picture)


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    try:
        Image.fromarray(array).save(path, format="PNG")
    except OSError as e:
        raise SubmitError(f"{path}: cannot write ({e.strerror or e})") from e


def _items(files: Sequence[Path]) -> list[tuple[str, Path]]:
    """(id, path) per file; the id is the file name without ``.dcm``. Unreadable files,
    unusable or repeated ids raise naming the file, before any model is loaded."""
    items, seen = [], {}
    for path in map(Path, files):
        read_header(path)  # cheap (~1 ms): a non-DICOM fails here, naming the file
        image_id = path.name[:-4] if path.name.lower().endswith(".dcm") else path.name
        reason = check_id(image_id)
        if reason is not None:
            raise SubmitError(f"{path}: {reason}")
        if image_id in seen:
            raise SubmitError(f"{path}: image id {image_id} also comes from {seen[image_id]}; "
                              "the output PNGs would overwrite each other")
        seen[image_id] = path
        items.append((image_id, path))
    return items


def predict(cfg: Config, files: Sequence[Path], *, out: Path, folds: Any = "all",
            weights: str = "auto", thresholds: dict[str, Any] | None = None,
            size: int = 1024, batch_size: int | None = None, hflip: bool = True,
            scales: str | Sequence[float] = (1.0,), workdir: Path = Path(".")) -> str:
    """Writes ``<id>_prob.png``, ``<id>_mask.png`` and ``<id>_overlay.png`` for each DICOM into
    ``out`` (created) and returns a summary: one line per image (label probability, mask
    area) and a last line with the models and thresholds.

    Options as in :func:`tfpneumo.inference.submission.submit`. A file that is not a readable DICOM raises
    :class:`tfpneumo.data.dicom.DicomError` naming it.
    """
    start = time.perf_counter()
    if not files:
        raise SubmitError("no DICOM files given")
    scales, batch_size = check_inference_options(cfg, size, scales, batch_size)
    items = _items(files)
    rule, source = resolve_thresholds(cfg, workdir, thresholds, size)
    model_files = ensemble_files(cfg, workdir, folds, weights)
    nets = [load_model_file(p) for p in model_files]

    from tfpneumo.data.pipeline import normalize
    from tfpneumo.inference.ensemble import ensemble_predictor

    predictor = ensemble_predictor(nets, hflip=hflip, scales=scales)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SubmitError(f"{out}: cannot create folder ({e.strerror or e})") from e
    lines = []
    for batch in image_batches(items, size, batch_size, cache_clahe(cfg)):
        probs, labels = predictor(normalize(batch.images[..., None]))
        probs, labels = probs.numpy()[..., 0], labels.numpy()
        for i, image_id in enumerate(batch.ids):
            original = batch.originals[i]
            label_prob = float(labels[i])
            full = full_size_prob(probs[i], original.shape)
            keep = rule.keep(probs[i], label_prob)
            mask = (full >= rule.bottom) if keep else np.zeros(original.shape, bool)
            _save_png(np.clip(np.rint(full * 255.0), 0, 255).astype(np.uint8),
                      out / f"{image_id}_prob.png")
            _save_png(mask.astype(np.uint8) * 255, out / f"{image_id}_mask.png")
            _save_png(overlay(original, mask, label_prob), out / f"{image_id}_overlay.png")
            area = int(mask.sum())
            lines.append(f"{image_id}: p={label_prob:.3f}, mask {area} px "
                         f"({100.0 * area / mask.size:.2f}%)")
    lines.append(f"wrote {3 * len(items)} PNGs to {out} for {len(items)} image(s); ensemble of "
                 f"{len(nets)} fold(s), size {size}; thresholds {rule.describe()} ({source}); "
                 f"{time.perf_counter() - start:.1f} s")
    return "\n".join(lines)
