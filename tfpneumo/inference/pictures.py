"""``tfpneumo predict``: pictures of the ensemble's prediction for a few DICOMs.

For each file ``<id>.dcm`` three PNGs at the DICOM's own size go into ``out``, each written
whole or not at all (a temporary file, then a rename):

``<id>_prob.png``     mask probability as 8-bit grey (0..255 = 0..1)
``<id>_mask.png``     the thresholded, gated mask (0 / 255), exactly what ``submit`` encodes
``<id>_overlay.png``  the radiograph in grey, the mask tinted red (semi-transparent) with a
                      2-px outline, and "pneumothorax p=0.87" (the label probability)

Models, TTA and thresholds are those of :mod:`tfpneumo.inference.submission`.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tfpneumo import runs
from tfpneumo.config import Config
from tfpneumo.drawing import font
from tfpneumo.errors import TfpneumoError
from tfpneumo.evaluation.rules import resize_prob, resolve_rule
from tfpneumo.files import write_bytes
from tfpneumo.inference.ensemble import check_options, predictor
from tfpneumo.inference.images import dicom_items

TINT = (255, 0, 0)
TINT_ALPHA = 0.35
OUTLINE = (255, 40, 40)


def outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool mask -> (H, W) bool boundary, 2 px wide (one inside, one outside): the
    morphological gradient (dilation minus erosion) with a 3x3 cross."""
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, kernel) > 0


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
    text_font = font(max(12, height // 32))
    text = f"pneumothorax p={label_prob:.2f}"
    draw = ImageDraw.Draw(picture, "RGBA")
    margin = max(4, height // 128)
    left, top, right, bottom = draw.textbbox((2 * margin, 2 * margin), text, font=text_font)
    draw.rectangle([left - margin, top - margin, right + margin, bottom + margin],
                   fill=(0, 0, 0, 170))
    draw.text((2 * margin, 2 * margin), text, fill=(255, 255, 255, 255), font=text_font)
    return np.asarray(picture)


def _save_png(array: np.ndarray, path: Path) -> None:
    """``array`` as a PNG under exactly ``path``, whole or not at all: encoded in memory, then
    written to a temporary file and renamed (a full disk left 0-byte PNGs under the final
    names). A full disk or quota is one line naming the file."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    try:
        write_bytes(path, buffer.getvalue())
    except OSError as e:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise TfpneumoError(f"{path}: cannot write ({os.strerror(e.errno)}); free space and "
                                "rerun") from None
        raise TfpneumoError(f"{path}: cannot write ({e.strerror or e})") from e


def predict(cfg: Config, files: Sequence[Path], *, out: Path, folds: runs.FoldSpec = "all",
            weights: str = "auto", rule: dict[str, Any] | None = None,
            size: int = 1024, batch_size: int | None = None, hflip: bool = True,
            scales: Sequence[float] = (1.0,), workdir: Path = Path(".")) -> str:
    """Writes ``<id>_prob.png``, ``<id>_mask.png`` and ``<id>_overlay.png`` for each DICOM into
    ``out`` (created) and returns a summary: one line per image (label probability, mask
    area) and a last line with the models and thresholds.

    Options as in :func:`tfpneumo.inference.submission.submit`. A file that is not a readable
    DICOM raises :class:`tfpneumo.data.dicom.DicomError` naming it.
    """
    start = time.perf_counter()
    if not files:
        raise TfpneumoError("no DICOM files given")
    check_options(size, batch_size, scales)
    items = dicom_items(files, cfg.data.max_dicom_mib)
    decision, source = resolve_rule(cfg.experiment, workdir, rule, size * size, weights)
    ensemble = predictor(cfg, folds=folds, weights=weights, size=size, batch_size=batch_size,
                         hflip=hflip, scales=scales, workdir=workdir)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TfpneumoError(f"{out}: cannot create folder ({e.strerror or e})") from e
    lines = []
    for p in ensemble.predict(items):
        full = resize_prob(p.prob, p.original.shape)
        mask = decision.mask(p.prob, p.label_prob, p.original.shape)
        _save_png(np.clip(np.rint(full * 255.0), 0, 255).astype(np.uint8), out / f"{p.image_id}_prob.png")
        _save_png(mask.astype(np.uint8) * 255, out / f"{p.image_id}_mask.png")
        _save_png(overlay(p.original, mask, p.label_prob), out / f"{p.image_id}_overlay.png")
        area = int(mask.sum())
        lines.append(f"{p.image_id}: p={p.label_prob:.3f}, mask {area} px "
                     f"({100.0 * area / mask.size:.2f}%)")
    lines.append(f"wrote {3 * len(items)} PNGs to {out} for {len(items)} image(s); "
                 f"{ensemble.describe()}; thresholds {decision.describe()} ({source}); "
                 f"{time.perf_counter() - start:.1f} s")
    return "\n".join(lines)
