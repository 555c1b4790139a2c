"""``tfpneumo predict``: the ensemble's prediction for a few DICOMs, as pictures and files.

For each file ``<id>.dcm``, in ``out``, each file written whole or not at all (a temporary
file, then a rename), all at the DICOM's own size:

``--format png`` (the default):
``<id>_prob.png``     mask probability as 8-bit grey (0..255 = 0..1)
``<id>_mask.png``     the thresholded, gated mask (0 / 255), exactly what ``submit`` encodes
``<id>_overlay.png``  the radiograph in grey, the mask tinted red (semi-transparent) with a
                      2-px outline, and "pneumothorax p=0.87" (the label probability)

``--format dicom-seg`` (or ``png,dicom-seg`` for both):
``<id>_seg.dcm``      a DICOM Segmentation referencing the source image: the mask (BINARY), or
                      with ``--seg-type fractional`` the probability (see
                      :mod:`tfpneumo.inference.dicom_seg`)

``--save-probs``: ``<id>_prob.npz`` (compressed): ``probability`` (H, W) float16 and
``label_probability`` () float32.
``--explain``: ``<id>_gradcam.png``, the Grad-CAM map of the classification head blended on
the radiograph (:mod:`tfpneumo.inference.gradcam`).

Models, TTA and thresholds are those of :mod:`tfpneumo.inference.submission`.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tfpneumo import runs
from tfpneumo.config import Config
from tfpneumo.drawing import caption
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
    from PIL import Image

    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    tint = np.array(TINT, np.float32)
    rgb[mask] = (1.0 - TINT_ALPHA) * rgb[mask] + TINT_ALPHA * tint
    rgb[outline(mask)] = OUTLINE
    picture = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    caption(picture, f"pneumothorax p={label_prob:.2f}")
    return np.asarray(picture)


FORMATS = ("png", "dicom-seg")


def check_formats(formats: Sequence[str], seg_type: str) -> tuple[str, ...]:
    """The output formats, validated (one-line error naming the option)."""
    from tfpneumo.inference.dicom_seg import SEG_TYPES

    chosen = tuple(dict.fromkeys(str(f).strip().lower() for f in formats))
    if not chosen or any(f not in FORMATS for f in chosen):
        raise TfpneumoError(f"--format {','.join(map(str, formats))}: expected png, dicom-seg "
                            "or png,dicom-seg")
    if seg_type not in SEG_TYPES:
        raise TfpneumoError(f"--seg-type {seg_type}: expected one of {', '.join(SEG_TYPES)}")
    return chosen


def _save(path: Path, data: bytes) -> None:
    """``data`` under exactly ``path``, whole or not at all: written to a temporary file and
    renamed (a full disk left 0-byte PNGs under the final names). A full disk or quota is one
    line naming the file."""
    try:
        write_bytes(path, data)
    except OSError as e:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise TfpneumoError(f"{path}: cannot write ({os.strerror(e.errno)}); free space and "
                                "rerun") from None
        raise TfpneumoError(f"{path}: cannot write ({e.strerror or e})") from e


def _save_png(array: np.ndarray, path: Path) -> None:
    """``array`` as a PNG, encoded in memory, then :func:`_save`."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    _save(path, buffer.getvalue())


def _save_probs(prob: np.ndarray, label_prob: float, path: Path) -> None:
    """The full-size probability as float16 (every value within 2**-12 of the float32 one, in
    half the bytes) and the label probability, compressed, then :func:`_save`."""
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, probability=prob.astype(np.float16),
                        label_probability=np.float32(label_prob))
    _save(path, buffer.getvalue())


def _algorithm(cfg: Config, ensemble, decision, seg_type: str):
    """What the SEG records of how it was made (Algorithm Identification parameters). The
    stored text is ``key=value,key=value``: lists are joined by spaces, no value holds a comma
    or an equals sign."""
    import tfpneumo
    from tfpneumo.inference.dicom_seg import Algorithm

    rule = {f"rule_{k}" if k != "rule" else "rule": f"{v:g}" if isinstance(v, float) else str(v)
            for k, v in decision.to_json().items() if v is not None}
    return Algorithm(tfpneumo.__version__, {
        "run": cfg.experiment,
        "folds": " ".join(str(runs.fold_of(f)) for f in ensemble.files),
        "weights": " ".join(f"{f.parent.name}/{f.name}" for f in ensemble.files),
        **rule,
        "size": str(ensemble.size),
        "hflip": "yes" if ensemble.hflip else "no",
        "scales": " ".join(f"{s:g}" for s in ensemble.scales),
        "content": "mask under the rule" if seg_type == "binary" else "probability before the rule",
    })


@dataclass
class _Writer:
    """The files of one image in ``out`` (the module docstring), each through :func:`_save`."""

    out: Path
    formats: tuple[str, ...]
    seg_type: str = "binary"
    save_probs: bool = False
    sources: dict[str, Any] = field(default_factory=dict)  # id -> dicom_seg.SegSource
    algorithm: Any = None  # dicom_seg.Algorithm, for dicom-seg
    cam: Callable[[np.ndarray], np.ndarray] | None = None  # original -> Grad-CAM map

    def check_seg_sources(self) -> None:
        """Builds (and drops) an empty SEG of every source: a header highdicom refuses fails
        here, naming the file, before anything is written (~60 ms an image)."""
        from tfpneumo.inference.dicom_seg import build_seg

        for source in self.sources.values():
            build_seg(source, np.zeros(source.shape, bool), self.algorithm)

    def write(self, image_id: str, original: np.ndarray, full: np.ndarray, mask: np.ndarray,
              label_prob: float) -> int:
        """Writes the outputs of one image; returns how many files. ``original`` (H, W)
        uint8, ``full`` (H, W) float32 probability, ``mask`` (H, W) bool."""
        stem, written = self.out / image_id, 0
        if "png" in self.formats:
            _save_png(np.clip(np.rint(full * 255.0), 0, 255).astype(np.uint8),
                      Path(f"{stem}_prob.png"))
            _save_png(mask.astype(np.uint8) * 255, Path(f"{stem}_mask.png"))
            _save_png(overlay(original, mask, label_prob), Path(f"{stem}_overlay.png"))
            written += 3
        if "dicom-seg" in self.formats:
            from tfpneumo.inference.dicom_seg import build_seg, seg_bytes

            pixels = mask if self.seg_type == "binary" else full
            seg = build_seg(self.sources[image_id], pixels, self.algorithm, self.seg_type)
            _save(Path(f"{stem}_seg.dcm"), seg_bytes(seg))
            written += 1
        if self.save_probs:
            _save_probs(full, label_prob, Path(f"{stem}_prob.npz"))
            written += 1
        if self.cam is not None:
            from tfpneumo.inference.gradcam import heat_overlay

            _save_png(heat_overlay(original, self.cam(original), label_prob),
                      Path(f"{stem}_gradcam.png"))
            written += 1
        return written


def _grad_cam_of(ensemble) -> Callable[[np.ndarray], np.ndarray]:
    """original (H, W) uint8 -> (H, W) Grad-CAM map of the ensemble, with its TTA."""
    from tfpneumo.data.preprocess import network_image
    from tfpneumo.inference.gradcam import explain, gradcam_model

    models = [gradcam_model(net) for net in ensemble.nets]
    return lambda original: explain(models, network_image(original, ensemble.size,
                                                          ensemble.clahe),
                                    original.shape, hflip=ensemble.hflip,
                                    scales=ensemble.scales)


def predict(cfg: Config, files: Sequence[Path], *, out: Path, folds: runs.FoldSpec = "all",
            weights: str = "auto", rule: dict[str, Any] | None = None,
            size: int = 1024, batch_size: int | None = None, hflip: bool = True,
            scales: Sequence[float] = (1.0,), workdir: Path = Path("."),
            formats: Sequence[str] = ("png",), seg_type: str = "binary",
            save_probs: bool = False, explain: bool = False,
            precision: str = "float32") -> str:
    """Writes the files of the module docstring for each DICOM into ``out`` (created) and
    returns a summary: one line per image (label probability, mask area, values a SEG had to
    fill in) and a last line with the models and thresholds.

    Options as in :func:`tfpneumo.inference.submission.submit`. A file that is not a readable
    DICOM (or, for ``dicom-seg``, cannot be referenced by a SEG) raises naming it, before any
    model is loaded or anything is written.
    """
    start = time.perf_counter()
    if not files:
        raise TfpneumoError("no DICOM files given")
    check_options(size, batch_size, scales, precision)
    writer = _Writer(Path(out), check_formats(formats, seg_type), seg_type, save_probs)
    items = dicom_items(files, cfg.data.max_dicom_mib)
    if "dicom-seg" in writer.formats:
        from tfpneumo.inference.dicom_seg import seg_source

        writer.sources = {image_id: seg_source(path, cfg.data.max_dicom_mib)
                          for image_id, path in items}
    decision, source = resolve_rule(cfg.experiment, workdir, rule, size * size, weights)
    ensemble = predictor(cfg, folds=folds, weights=weights, size=size, batch_size=batch_size,
                         hflip=hflip, scales=scales, workdir=workdir, merge=decision.merge,
                         precision=precision)
    if writer.sources:
        writer.algorithm = _algorithm(cfg, ensemble, decision, seg_type)
        writer.check_seg_sources()
    if explain:
        writer.cam = _grad_cam_of(ensemble)
    try:
        writer.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TfpneumoError(f"{writer.out}: cannot create folder ({e.strerror or e})") from e
    lines, written = [], 0
    for p in ensemble.predict(items):
        mask = decision.mask(p.prob, p.label_prob, p.original.shape)
        written += writer.write(p.image_id, p.original, resize_prob(p.prob, p.original.shape),
                                mask, p.label_prob)
        notes = writer.sources[p.image_id].notes if writer.sources else []
        area = int(mask.sum())
        lines.append(f"{p.image_id}: p={p.label_prob:.3f}, mask {area} px "
                     f"({100.0 * area / mask.size:.2f}%)" + "".join(f"; {n}" for n in notes))
    extras = ", probabilities" * save_probs + ", Grad-CAM" * explain
    lines.append(f"wrote {written} file{'' if written == 1 else 's'} to {writer.out} for "
                 f"{len(items)} image(s) ({', '.join(writer.formats)}{extras}); "
                 f"{ensemble.describe()}; thresholds {decision.describe()} ({source}); "
                 f"{time.perf_counter() - start:.1f} s")
    return "\n".join(lines)
