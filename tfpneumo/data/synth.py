"""Synthetic SIIM-ACR dataset: chest-radiograph-like DICOMs and RLE labels in the Kaggle layout.

``synthesize(out)`` writes::

    OUT/dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    OUT/dicom-images-test/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    OUT/train-rle.csv          header "ImageId, EncodedPixels", one row per annotation
    OUT/sample_submission.csv  header "ImageId,EncodedPixels", every test id with -1

The DICOMs mirror the real ones: 8-bit MONOCHROME2, JPEG Baseline (1.2.840.10008.1.2.4.50)
encapsulated pixel data, Secondary Capture, CR, CHEST, PatientID/Age/Sex, ViewPosition.

Images are drawn procedurally (numpy + OpenCV, ~0.05 s per 1024 px image written): body
and shoulders, two lung fields, mediastinum, heart, spine, trachea, clavicles, posterior and
anterior ribs, diaphragm domes, and branching vascular markings from the hila. A pneumothorax
is the part of a lung between the chest wall and the collapsed lung: it has no vascular
markings, is darker, and is bounded on the lung side by a thin bright visceral pleural line.
Its mask is exactly that region. With ``masks_from`` the regions are real SIIM masks instead of
procedural shapes (the lungs are drawn where real lungs are, and stretched to hold the shape).

Every image has its own child seed, ``SeedSequence(seed, spawn_key=(split, index))``, so image
``i`` is the same whatever ``n_train`` / ``n_test`` are, and the same seed gives byte-identical
files (on one machine: JPEG and OpenCV builds may differ across platforms).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from tfpneumo.data import rle
from tfpneumo.errors import TfpneumoError

# pydicom's own UID root (1.2.826.0.1.3680043.8.498): the real files use OFFIS's root, which is
# not ours to mint UIDs under. The suffix mirrors the real ".<kind>.<n>.<n>.<n>" pattern.
UID_ROOT = "1.2.826.0.1.3680043.8.498"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
TRAIN_DIR = "dicom-images-train"
TEST_DIR = "dicom-images-test"
LABELS_CSV = "train-rle.csv"
SUBMISSION_CSV = "sample_submission.csv"
# Real pixel spacings of the SIIM DICOMs (mm at 1024 px).
_SPACINGS = (0.139, 0.143, 0.168, 0.171, 0.194311)
_SPLITS = {"train": 1, "test": 2}


class SynthError(TfpneumoError):
    """Bad arguments to :func:`synthesize` or an unusable ``masks_from`` file."""


# --------------------------------------------------------------------------------------------
# Anatomy parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lung:
    """One lung field in normalised image coordinates (x right, y down, both in [0, 1]).

    ``side`` is -1 for the image-left lung (patient's right on a PA film), +1 for the other.
    Lateral distances ``w`` are measured from the midline ``cx`` towards the lung's own side.
    """

    side: int
    top: float  # y of the apex
    base: float  # y of the costophrenic angle
    wm: float  # medial border (distance from the midline)
    width: float  # medial-to-lateral width at the base
    apex: float  # apex position as a fraction of the width from the medial border
    dome: float  # height of the diaphragm dome
    hilum: tuple[float, float]  # (w, y) of the hilum


@dataclass(frozen=True)
class _Anatomy:
    cx: float
    lungs: tuple[_Lung, _Lung]
    body_hw: float
    neck_hw: float
    neck_y: float
    heart: tuple[float, float, float, float, float]  # x, y, rx, ry, angle (rad)
    female: bool
    arms: bool
    humeral_heads: bool
    gastric_bubble: bool


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    cx = 0.5 + rng.normal(0.0, 0.012)
    # Apex and base where real SIIM lungs are (real masks start at y ~ 0.07-0.14).
    top = rng.uniform(0.08, 0.15)
    height = rng.uniform(0.6, 0.7)
    lungs = []
    for side in (-1, 1):
        # The patient's left hemidiaphragm (image right) usually sits a little lower.
        base = min(top + height + (rng.uniform(0.0, 0.03) if side > 0 else 0.0), 0.88)
        ltop = top + rng.normal(0.0, 0.008)
        wm = rng.uniform(0.035, 0.055) + (0.01 if side > 0 else 0.0)
        width = rng.uniform(0.27, 0.32)
        hilum = (wm + rng.uniform(0.05, 0.08), ltop + rng.uniform(0.3, 0.38) * (base - ltop))
        lungs.append(_Lung(side, ltop, base, wm, width, rng.uniform(0.32, 0.45),
                           rng.uniform(0.07, 0.12), hilum))
    right = lungs[1]
    heart = (cx + rng.uniform(0.03, 0.06), right.base - rng.uniform(0.1, 0.14),
             rng.uniform(0.13, 0.17), rng.uniform(0.09, 0.12), rng.uniform(-0.6, -0.3))
    outer = max(lu.wm + lu.width for lu in lungs)
    return _Anatomy(
        cx=cx, lungs=(lungs[0], lungs[1]), body_hw=outer + rng.uniform(0.06, 0.11),
        neck_hw=rng.uniform(0.085, 0.12), neck_y=top - rng.uniform(0.06, 0.1), heart=heart,
        female=bool(rng.random() < 0.45), arms=bool(rng.random() < 0.5),
        humeral_heads=bool(rng.random() < 0.6), gastric_bubble=bool(rng.random() < 0.4),
    )


def _fit_lungs(an: _Anatomy, mask: np.ndarray) -> _Anatomy:
    """Grow the lungs so that they hold a real ``(H, W)`` 0/1 mask (its apex, wall and base).

    Real masks sit inside real lungs; stretching the drawn lung to reach them keeps the
    pneumothorax inside a lung field instead of over the shoulder or the mediastinum.
    """
    n = mask.shape[0]
    ys, xs = np.nonzero(mask)
    xs, ys = (xs + 0.5) / n, (ys + 0.5) / n
    lungs = list(an.lungs)
    for i, lung in enumerate(lungs):
        on_side = lung.side * (xs - an.cx) > 0
        if not on_side.any():
            continue
        w = lung.side * (xs[on_side] - an.cx)
        y = ys[on_side]
        wm = max(min(lung.wm, float(w.min()) - 0.005), 0.02)
        top = min(lung.top, float(y.min()) - 0.015)
        base = min(max(lung.base, float(y.max()) + 0.02), 0.95)
        width = max(lung.width + lung.wm - wm, float(w.max()) + 0.02 - wm)
        lungs[i] = replace(lung, wm=wm, top=top, base=base, width=width)
    outer = max(lu.wm + lu.width for lu in lungs)
    top = min(lu.top for lu in lungs)
    return replace(an, lungs=(lungs[0], lungs[1]), body_hw=max(an.body_hw, outer + 0.05),
                   neck_y=min(an.neck_y, top - 0.05))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * z)


def _smoothstep(z: np.ndarray) -> np.ndarray:
    z = np.clip(z, 0.0, 1.0)
    return z * z * (3.0 - 2.0 * z)


def _lateral_profile(t: np.ndarray, knee: float, power: float) -> np.ndarray:
    """0 at the apex (t=0), rising like a rounded dome to 1 at ``t = knee``."""
    return np.sin((np.pi / 2) * np.clip(t / knee, 0.0, 1.0)) ** power


def _lung_field(x: np.ndarray, y: np.ndarray, cx: float, lung: _Lung) -> np.ndarray:
    """Signed lung field, positive inside, roughly a distance in image widths (broadcasts)."""
    return np.minimum(_lung_walls(x, y, cx, lung), _diaphragm(x, y, cx, lung))


def _diaphragm(x: np.ndarray, y: np.ndarray, cx: float, lung: _Lung) -> np.ndarray:
    """Signed distance above the diaphragm dome of ``lung`` (positive above)."""
    w = lung.side * (x - cx)
    wd = (w - (lung.wm + 0.4 * lung.width)) / (0.65 * lung.width)
    return lung.base - lung.dome * np.clip(1.0 - wd * wd, 0.0, 1.0) - y


def _lung_walls(x: np.ndarray, y: np.ndarray, cx: float, lung: _Lung) -> np.ndarray:
    """Signed distance inside the lateral and medial borders of ``lung`` (apex included)."""
    w = lung.side * (x - cx)
    t = (y - lung.top) / (lung.base - lung.top)
    a = lung.wm + lung.apex * lung.width
    lateral = a + ((1.0 - lung.apex) * lung.width + 0.03 * np.clip(t, 0, 1)) * _lateral_profile(
        t, 0.62, 0.55)
    medial = a - (a - lung.wm) * _lateral_profile(t, 0.3, 0.6)
    return np.minimum(lateral - w, w - medial)


def _cage_field(x: np.ndarray, y: np.ndarray, cx: float, lung: _Lung) -> np.ndarray:
    """Signed field of one half of the rib cage: the lung widened and without its diaphragm."""
    w = lung.side * (x - cx)
    t = (y - lung.top + 0.06) / (lung.base - lung.top + 0.06)
    lateral = lung.wm + lung.width + 0.03 * np.clip(t, 0, 1) + 0.035
    lateral = lateral * _lateral_profile(t, 0.55, 0.4)
    return np.minimum(np.minimum(lateral - w, w - 0.035), lung.base + 0.04 - y)


def _lung_field_at(x: np.ndarray, y: np.ndarray, cx: float, lung: _Lung,
                   collapse: _Collapse | None) -> np.ndarray:
    """The lung field, or with ``collapse`` the field of the collapsed lung.

    Collapse pulls the lung towards its hilum along one direction ``d``: the coordinate along
    ``d`` (beyond the hilum) is stretched by ``1 + amount * g`` before the lookup, where ``g``
    is a Gaussian of the coordinate across ``d`` (so the collapse is local: an apical cap, a
    lateral crescent), and the other coordinate is unchanged (the base does not rise).
    """
    if collapse is None:
        return _lung_field(x, y, cx, lung)
    hx, hy = cx + lung.side * lung.hilum[0], lung.hilum[1]
    dw, dy = lung.side * (x - hx), y - hy  # lung frame: +w lateral, +y down
    c, s = math.cos(collapse.direction), math.sin(collapse.direction)
    along = dw * c + dy * s
    across = -dw * s + dy * c
    # Exactly 0 away from the zone, so the collapsed field equals the lung field there and no
    # stray mask pixels appear along the rest of the lung edge.
    g = np.maximum(np.exp(-(((across - collapse.center) / collapse.spread) ** 2)) - 0.03, 0.0)
    wobble = 1.0 + 0.15 * np.sin(across * 40.0 + collapse.phase)
    along = np.where(along > 0, along * (1.0 + collapse.amount * g * wobble), along)
    w2 = along * c - across * s
    y2 = along * s + across * c
    # The lung stays on the diaphragm: only its walls and apex move.
    return np.minimum(_lung_walls(hx + lung.side * w2, hy + y2, cx, lung),
                      _diaphragm(x, y, cx, lung))


@dataclass(frozen=True)
class _Collapse:
    side_index: int
    direction: float  # radians, lung frame: 0 lateral, -pi/2 towards the apex
    amount: float  # 0.07 (sliver) .. 1.1 (large collapse)
    center: float  # centre of the collapsed zone across the direction (image widths)
    spread: float  # its half-width (image widths)
    phase: float


def _sample_collapse(rng: np.random.Generator, side_index: int) -> _Collapse:
    kind = rng.random()
    if kind < 0.45:  # apical cap
        direction = -np.pi / 2 + rng.uniform(0.0, 0.5)
        center = rng.uniform(-0.05, 0.08)
    elif kind < 0.85:  # lateral crescent
        direction = rng.uniform(-0.6, 0.2)
        center = rng.uniform(-0.15, 0.12)
    else:  # basal-lateral
        direction = rng.uniform(0.2, 0.6)
        center = rng.uniform(-0.1, 0.05)
    # Log-uniform size: many moderate, some slivers, some large collapses.
    amount = float(np.exp(rng.uniform(np.log(0.1), np.log(1.3))))
    return _Collapse(side_index, float(direction), amount, float(center),
                     float(rng.uniform(0.1, 0.35)), float(rng.uniform(0, 2 * np.pi)))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _axes(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of an n x n grid: x ``(1, n)``, y ``(n, 1)`` float32."""
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    return c[None, :], c[:, None]


def _resize(a: np.ndarray, n: int) -> np.ndarray:
    if a.shape[0] == n:
        return a
    return cv2.resize(a, (n, n), interpolation=cv2.INTER_LINEAR)


def _ellipse(x, y, x0, y0, rx, ry, angle=0.0) -> np.ndarray:
    """Normalised squared radius of a rotated ellipse (1 on its border)."""
    c, s = math.cos(angle), math.sin(angle)
    u, v = (x - x0) * c + (y - y0) * s, -(x - x0) * s + (y - y0) * c
    return (u / rx) ** 2 + (v / ry) ** 2


def _pts(xs: np.ndarray, ys: np.ndarray, n: int) -> np.ndarray:
    """Normalised coordinates -> OpenCV fixed-point (shift 4) int32 points ``(K, 2)``."""
    return np.round(np.stack([xs, ys], axis=-1) * (n * 16) - 8).astype(np.int32)


def _draw(canvas: np.ndarray, lines: list[np.ndarray], value: int, thickness: float) -> None:
    if lines:
        cv2.polylines(canvas, lines, False, value, max(1, round(thickness)), cv2.LINE_AA, 4)


def _bones(rng: np.random.Generator, an: _Anatomy, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Ribs and clavicles: two ``(n, n) float32`` densities with bright cortical edges."""
    post = np.zeros((n, n), np.uint8)
    ant = np.zeros((n, n), np.uint8)
    clav = np.zeros((n, n), np.uint8)
    spacing = rng.uniform(0.05, 0.06)
    th = 0.019 * n * rng.uniform(0.9, 1.1)
    outer_post, inner_post, outer_ant, inner_ant, outer_cl, inner_cl = ([] for _ in range(6))
    for lung in an.lungs:
        s = lung.side
        y0 = lung.top - 0.045 + rng.normal(0, 0.005)
        k = 0
        while y0 < lung.base + 0.08 and k < 12:
            t = (y0 - lung.top) / (lung.base - lung.top)
            a = lung.wm + lung.apex * lung.width
            wall = a + ((1 - lung.apex) * lung.width + 0.03 * min(max(t, 0), 1)) * float(
                _lateral_profile(np.float32(t + 0.12), 0.62, 0.55)) + 0.035
            w = np.linspace(0.022, wall, 16)
            peak = 0.022 + rng.uniform(0.3, 0.45) * (wall - 0.022)
            curv = (3.2 if k == 0 else rng.uniform(1.3, 1.9))
            yy = y0 + curv * ((w - peak) ** 2 - (0.022 - peak) ** 2)
            pts = _pts(an.cx + s * w, yy, n)
            outer_post.append(pts)
            inner_post.append(pts)
            if 1 <= k <= 7:  # anterior arc: from the lateral wall medially and downward
                wa = np.linspace(wall - 0.01, rng.uniform(0.1, 0.17), 10)
                frac = (wall - 0.01 - wa) / (wall - 0.01 - wa[-1])
                ya = yy[-1] - 0.03 + rng.uniform(0.08, 0.12) * frac ** 1.15
                pa = _pts(an.cx + s * wa, ya, n)
                outer_ant.append(pa)
                inner_ant.append(pa)
            y0 += spacing * (1 + 0.05 * k) + rng.normal(0, 0.003)
            k += 1
        # Clavicle: S-shaped from the sternal notch up to the shoulder.
        wc = np.linspace(0.025, lung.wm + lung.width + 0.06, 14)
        u = (wc - wc[0]) / (wc[-1] - wc[0])
        ys = lung.top + rng.uniform(0.01, 0.04)
        ye = lung.top - rng.uniform(0.03, 0.07)
        yc = ys + (ye - ys) * u + 0.012 * np.sin(2 * np.pi * u)
        pc = _pts(an.cx + s * wc, yc, n)
        outer_cl.append(pc)
        inner_cl.append(pc)
    _draw(post, outer_post, 255, th)
    _draw(post, inner_post, 90, th * 0.6)
    _draw(ant, outer_ant, 255, th * 1.15)
    _draw(ant, inner_ant, 150, th * 0.7)
    _draw(clav, outer_cl, 255, th * 1.25)
    _draw(clav, inner_cl, 170, th * 0.7)
    ribs = post.astype(np.float32) * (1.0 / 255) + ant.astype(np.float32) * (0.45 / 255)
    return ribs, clav.astype(np.float32) * (1.8 / 255)


def _vessels(rng: np.random.Generator, an: _Anatomy, fields: list[np.ndarray],
             n: int) -> np.ndarray:
    """Branching vascular markings from the hila, ``(n, n) float32`` in [0, ~1].

    Each level of the trees is grown for all tips at once; tips stop once they leave the lung
    (``fields``: the lungs' signed fields on a coarser grid).
    """
    canvas = np.zeros((n, n), np.uint8)
    m = fields[0].shape[0]
    levels = 9
    segs_by_level: list[list[np.ndarray]] = [[] for _ in range(levels)]
    for lung, field in zip(an.lungs, fields, strict=True):
        s = lung.side
        n0 = int(rng.integers(7, 10))
        ang = np.sort(rng.uniform(-1.9, 2.0, n0)) + rng.normal(0, 0.1, n0)
        hw, hy = lung.hilum
        px = np.full(n0, an.cx + s * hw) + rng.normal(0, 0.006, n0)
        py = np.full(n0, hy) + rng.normal(0, 0.012, n0)
        length = rng.uniform(0.045, 0.065, n0)
        for level in range(levels):
            if px.size == 0:
                break
            ang = ang + rng.normal(0, 0.15, ang.size)
            qx = px + s * length * np.cos(ang)
            qy = py + length * np.sin(ang)
            # Each branch is a slightly wavy 4-point polyline, not a straight stick.
            t = np.array([0.0, 1 / 3, 2 / 3, 1.0])[None, :]
            bend = rng.normal(0, 0.07, (px.size, 2)) * length[:, None]
            off = np.concatenate([np.zeros((px.size, 1)), bend, np.zeros((px.size, 1))], 1)
            nx, ny = -(qy - py), (qx - px)  # normal direction (unnormalised, |.| = length)
            nrm = np.hypot(nx, ny) + 1e-9
            bx = px[:, None] + (qx - px)[:, None] * t + off * (nx / nrm)[:, None]
            by = py[:, None] + (qy - py)[:, None] * t + off * (ny / nrm)[:, None]
            segs_by_level[level].append(np.stack([bx, by], -1))
            # Keep tips that are still inside the lung.
            ix = np.clip((qx * m).astype(np.int64), 0, m - 1)
            iy = np.clip((qy * m).astype(np.int64), 0, m - 1)
            keep = field[iy, ix] > 0.008
            qx, qy, ang, length = qx[keep], qy[keep], ang[keep], length[keep]
            # Each tip forks in two (sometimes continues alone).
            spread = rng.uniform(0.2, 0.55, ang.size)
            px = np.concatenate([qx, qx])
            py = np.concatenate([qy, qy])
            ang = np.concatenate([ang - spread, ang + spread * rng.uniform(0.4, 1.0, ang.size)])
            length = np.concatenate([length, length]) * rng.uniform(0.74, 0.88, 2 * qx.size)
            alive = rng.random(px.size) < (0.92 if level < 3 else 0.72)
            px, py, ang, length = px[alive], py[alive], ang[alive], length[alive]
    widths = (2.6, 2.2, 1.8, 1.5, 1.3, 1.1, 1.0, 1.0, 1.0)
    values = (230, 210, 190, 175, 160, 145, 130, 120, 110)
    for level in range(levels):
        if segs_by_level[level]:
            segs = np.concatenate(segs_by_level[level])  # (K, 4 points, 2 coords)
            pts = np.round(segs * (n * 16) - 8).astype(np.int32)
            _draw(canvas, list(pts), values[level], widths[level] * n / 512)
    out = canvas.astype(np.float32) * (1.0 / 255)
    return cv2.GaussianBlur(out, (0, 0), max(0.5, 0.6 * n / 512))


def _noise_field(rng: np.random.Generator, cells: int, n: int) -> np.ndarray:
    """Smooth zero-mean noise: ``cells``-square white noise upsampled to ``(n, n)``."""
    base = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(base, (n, n), interpolation=cv2.INTER_CUBIC)


def _clean_mask(mask: np.ndarray) -> np.ndarray:
    """Drop the sub-3-pixel tails of a 0/1 ``(H, W) uint8`` mask and its small stray parts.

    A crescent thinning out to nothing pixelates into isolated specks; nothing visible is
    drawn there, and real annotations are solid, so they are not labelled (opening with a 3x3
    square, then parts under 10% of the largest part's area are dropped).
    """
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 2:
        return mask
    areas = stats[:, cv2.CC_STAT_AREA]
    keep = (areas >= 0.1 * areas[1:].max()).astype(np.uint8)
    keep[0] = 0
    return keep[labels]


def _procedural_rows(rng: np.random.Generator, an: _Anatomy, collapses: list[_Collapse],
                     split_rows: int, lung_fields: list[np.ndarray], size: int, gm: int,
                     ) -> tuple[list[tuple[_Collapse, np.ndarray]], list[np.ndarray]]:
    """Masks of procedural pneumothoraces and their collapsed-lung fields.

    Returns ``[(collapse, collapsed field (gm, gm) float32)]`` for drawing and the annotation
    rows, ``(size, size) uint8`` 0/1 each. A region is at least 0.2% of the image (about the
    10th percentile of real SIIM masks) so that it stays visible at 256 px: too small a
    collapse is enlarged and retried.
    """
    gs = lung_fields[0].shape[0]
    x, y = _axes(gs)
    regions, rows = [], []
    for col_ in collapses:
        lung = an.lungs[col_.side_index]
        fl = _resize(lung_fields[col_.side_index].astype(np.float32), size)
        for _ in range(8):
            fc = _lung_field_at(x, y, an.cx, lung, col_).astype(np.float32)
            # Inside the lung, outside the collapsed lung, from the same smooth fields as the
            # drawing.
            mask = _clean_mask(((fl > 0) & (_resize(fc, size) <= 0)).astype(np.uint8))
            if mask.sum() >= 0.003 * size * size:
                break
            col_ = replace(col_, amount=col_.amount * 1.6, spread=min(col_.spread * 1.2, 0.4))
        regions.append((col_, _resize(fc, gm)))
        rows.append(mask)
    if split_rows:
        # Annotators sometimes outline one pneumothorax in several pieces.
        big = int(np.argmax([m.sum() for m in rows]))
        m = rows[big]
        ys = np.flatnonzero(m.any(axis=1))
        if ys.size >= 8:
            cut = int(ys[0] + rng.uniform(0.35, 0.65) * (ys[-1] - ys[0]))
            top, bottom = m.copy(), m.copy()
            top[cut:] = 0
            bottom[:cut] = 0
            rows[big:big + 1] = [top, bottom]
    return regions, rows


@dataclass
class _Rendered:
    image: np.ndarray  # (size, size) uint8
    rows: list[np.ndarray]  # one (size, size) uint8 0/1 mask per annotation row
    lung_field: np.ndarray  # (g, g) float32, g = min(size, 256): > 0 inside either lung


def _signed_from_mask(mask: np.ndarray, n: int) -> np.ndarray:
    """A smooth field, positive inside a binary mask, in image widths, at ``n x n``."""
    frac = cv2.resize(mask.astype(np.float32), (n, n), interpolation=cv2.INTER_AREA)
    frac = cv2.GaussianBlur(frac, (0, 0), 1.0)
    return (frac - 0.5) * (2.5 / n)


def _render(rng: np.random.Generator, size: int, positive: bool,
            real_rows: list[np.ndarray] | None) -> _Rendered:
    """One radiograph ``(size, size) uint8`` and its annotation masks (empty list if negative)."""
    gs = min(size, 256)  # smooth anatomy
    gm = min(size, 512)  # ribs, vessels, pleural line
    an = _sample_anatomy(rng)
    x, y = _axes(gs)
    cx = an.cx
    w_abs = np.abs(x - cx)

    # --- pathology layout (needed first: the real masks extend the lung fields) -------------
    collapses: list[_Collapse] = []
    n_rows = 0
    if positive and real_rows is None:
        r = rng.random()
        n_rows = 1 if r < 0.75 else (2 if r < 0.93 else 3)
        first = int(rng.integers(0, 2))
        collapses.append(_sample_collapse(rng, first))
        if n_rows >= 2 and rng.random() < 0.5 or n_rows == 3:
            collapses.append(_sample_collapse(rng, 1 - first))
    split_rows = n_rows - len(collapses) if positive and real_rows is None else 0

    mask_field_gs = None
    if real_rows is not None:
        union = np.zeros_like(real_rows[0])
        for m in real_rows:
            union |= m
        an = _fit_lungs(an, union)
        mask_field_gs = _signed_from_mask(union, gs)
    lung_fields = [_lung_field(x, y, cx, lu) for lu in an.lungs]
    lung_any = np.maximum(lung_fields[0], lung_fields[1])
    if mask_field_gs is not None:
        # Real shapes sit where real lungs are; let the lung field cover them.
        lung_any = np.maximum(lung_any, mask_field_gs)

    # --- smooth density at gs ---------------------------------------------------------------
    # Body: a flattened cylinder, with rounded shoulders from the neck, widening downwards.
    u = np.clip((y - an.neck_y) / 0.17, 0.0, 1.0)
    shoulder = np.sqrt(1.0 - (1.0 - u) ** 2)
    hw = an.neck_hw + (an.body_hw * (1.0 + 0.05 * (y - 0.3)) - an.neck_hw) * shoulder
    r = w_abs / hw
    body = np.sqrt(np.clip(1.0 - r ** 4, 0.0, 1.0)) * (0.92 + 0.1 * _smoothstep(y - 0.2))
    body_mask = _sigmoid((1.0 - r) / 0.01)
    if an.arms:
        for s in (-1, 1):
            ax = cx + s * (an.body_hw + 0.055 + 0.04 * (y - an.neck_y))
            arm = np.sqrt(np.clip(1.0 - ((x - ax) / 0.045) ** 2, 0, 1)) * _sigmoid(
                (y - an.neck_y - 0.12) / 0.02)
            body = body + 0.55 * arm
            body_mask = np.maximum(body_mask, (arm > 0).astype(np.float32))
    hx, hy, hrx, hry, hang = an.heart
    heart = _sigmoid((1.0 - _ellipse(x, y, hx, hy, hrx, hry, hang)) / 0.08)
    lung_mask = _sigmoid(lung_any / 0.003)
    # Air thickness grows away from the lung edge; lung in front of the heart is thinner.
    # Peripheral lung is thinner, hence brighter; a pneumothorax there is a full air column.
    edge_deficit = lung_mask * 0.45 * (1.0 - np.clip(lung_any / 0.07, 0, 1) ** 0.6)
    air = (lung_mask - edge_deficit) * (1.0 - 0.55 * heart)
    air = air * (1.0 + 0.07 * _noise_field(rng, 5, gs)) * np.clip(body / 0.7, 0.0, 1.0)
    dens = body - 0.78 * air + 0.12 * heart
    dens += 0.15 * _sigmoid((1.0 - _ellipse(x, y, cx + 0.045, an.lungs[1].top + 0.14,
                                            0.035, 0.03)) / 0.15)  # aortic knob
    # Spine: a column with vertebral bodies separated by darker discs, pedicles as rings.
    col = _sigmoid((0.033 - w_abs) / 0.004)
    period = rng.uniform(0.044, 0.052)
    phase = rng.uniform(0, period)
    verte = 0.8 + 0.2 * _smoothstep((np.cos(2 * np.pi * (y - phase) / period) + 0.6) / 0.8)
    dens += 0.16 * col * verte * _sigmoid((y - an.neck_y + 0.03) / 0.01)
    # Trachea: an air column above the carina.
    tx = cx + rng.normal(0, 0.004)
    carina = an.lungs[0].top + rng.uniform(0.17, 0.22)
    dens -= 0.13 * _sigmoid((0.016 - np.abs(x - tx)) / 0.003) * _sigmoid((carina - y) / 0.01)
    if an.female:
        for lu in an.lungs:
            bx = cx + lu.side * (lu.wm + 0.62 * lu.width)
            e = _ellipse(x, y, bx, lu.base - 0.08, 0.16, 0.12)
            dens += 0.12 * _sigmoid((1.0 - e) / 0.2) * _sigmoid((lu.base + 0.02 - y) / 0.008)
    if an.gastric_bubble:
        lu = an.lungs[1]
        e = _ellipse(x, y, cx + lu.wm + 0.45 * lu.width, lu.base + 0.035, 0.045, 0.028)
        dens -= 0.15 * _sigmoid((1.0 - e) / 0.1) * (lung_any < 0)
    if an.humeral_heads:
        for s in (-1, 1):
            e = _ellipse(x, y, cx + s * (an.body_hw - 0.01), an.neck_y + 0.12, 0.05, 0.055)
            dens += 0.12 * _sigmoid((1.0 - e) / 0.06)
    # The rib cage: bones are drawn only inside it.
    cage = _sigmoid((np.maximum(_cage_field(x, y, cx, an.lungs[0]),
                                _cage_field(x, y, cx, an.lungs[1]))) / 0.006)

    # --- fine layers at gm ------------------------------------------------------------------
    dens_m = _resize(dens.astype(np.float32), gm)
    lung_m = _resize(lung_mask.astype(np.float32), gm)
    cage_m = _resize(cage.astype(np.float32), gm)
    edge_m = _resize(edge_deficit.astype(np.float32), gm)
    ribs, clavicles = _bones(rng, an, gm)
    body_m = _resize(body_mask.astype(np.float32), gm)
    vessels = _vessels(rng, an, lung_fields, gm)
    # Parenchyma: the lung's own faint mottled density, absent inside a pneumothorax.
    tissue = 0.05 + 0.02 * _noise_field(rng, 48, gm)
    lung_tissue = (rng.uniform(0.1, 0.15) * vessels + tissue) * lung_m

    ptx_soft = np.zeros((gm, gm), np.float32)
    pleura = np.zeros((gm, gm), np.float32)
    collapsed_dense = np.zeros((gm, gm), np.float32)
    rows: list[np.ndarray] = []
    inner = _sigmoid((_resize(lung_any.astype(np.float32), gm) - 0.012) / 0.004)
    if positive:
        if real_rows is not None:
            field_c = _resize(-mask_field_gs.astype(np.float32), gm)  # > 0 outside the mask
            regions = [(None, field_c)]
            rows = real_rows
        else:
            regions, rows = _procedural_rows(rng, an, collapses, split_rows, lung_fields,
                                             size, gm)
        eps = 0.6 / gm
        for col_, fc in regions:
            if col_ is not None:
                fl = _resize(lung_fields[col_.side_index].astype(np.float32), gm)
                region = _sigmoid(fl / eps) * _sigmoid(-fc / eps)
                collapsed_dense += (0.06 * min(col_.amount, 1.0)) * _sigmoid(fc / 0.01) * \
                    _sigmoid(fl / eps)
            else:
                region = _sigmoid(-fc / eps)
            ptx_soft = np.maximum(ptx_soft, region)
            # Visceral pleural line: along the collapsed lung's edge, not along the chest wall.
            # ``dist`` ~ signed distance to that edge (field over its gradient norm).
            gy, gx = np.gradient(fc)
            dist = fc / (np.sqrt(gx * gx + gy * gy) * gm + 1e-6)
            sigma = 1.0 / gm
            pleura = np.maximum(pleura, np.exp(-0.5 * (dist / sigma) ** 2) * inner)
        rows = [m for m in rows if m.any()]

    amp_line = rng.uniform(0.1, 0.16)
    dens_m = (dens_m + rng.uniform(0.09, 0.14) * (ribs * cage_m + clavicles * body_m)
              + lung_tissue * (1.0 - ptx_soft)
              - (rng.uniform(0.02, 0.04) + rng.uniform(0.3, 0.45) * edge_m) * ptx_soft
              + collapsed_dense + amp_line * pleura)

    # --- exposure, response, noise ----------------------------------------------------------
    k = rng.uniform(1.2, 1.9)
    img = (1.0 - np.exp(-k * np.maximum(dens_m, 0.0))) / (1.0 - math.exp(-k * 1.35))
    lo, hi = rng.uniform(0.0, 0.15), rng.uniform(0.92, 1.1)
    img = np.clip((img - lo) / (hi - lo), 0.0, 1.0) ** rng.uniform(0.75, 1.3)
    img = _resize(img.astype(np.float32), size)
    # Uniform noise: a normal draw of 1024^2 values costs ~20 ms, a uniform one ~3 ms.
    noise_sd = rng.uniform(0.006, 0.018)
    img = img + (noise_sd * math.sqrt(12.0)) * (rng.random((size, size), np.float32) - 0.5)
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return _Rendered(out, rows, lung_any.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Real mask shapes (masks_from)
# --------------------------------------------------------------------------------------------


def _load_real_masks(path: Path) -> list[tuple[str, list[str]]]:
    """Positive images of a SIIM label CSV (plain or gzip): sorted ``(ImageId, [rle, ...])``."""
    import csv

    if not path.is_file():
        raise SynthError(f"{path}: --masks-from file not found")
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    try:
        raw = gzip.open(path, "rb").read() if gz else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise SynthError(f"{path}: cannot read the label CSV ({err})") from None
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    if header[:2] != ["ImageId", "EncodedPixels"]:
        raise SynthError(f"{path}: expected a SIIM label CSV with header 'ImageId, "
                         f"EncodedPixels', got {','.join(header)[:60]!r}")
    by_id: dict[str, list[str]] = {}
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) < 2:
            raise SynthError(f"{path}: row {line} has {len(row)} column(s), expected 2")
        value = row[1].strip()
        if value and value != "-1":
            by_id.setdefault(row[0].strip(), []).append(value)
    if not by_id:
        raise SynthError(f"{path}: no positive (non -1) masks to sample shapes from")
    return sorted(by_id.items())


def _sample_real_rows(rng: np.random.Generator, real: list[tuple[str, list[str]]], size: int,
                      path: Path) -> list[np.ndarray]:
    """The annotation rows of one random real positive image, resized to ``(size, size)``."""
    for _ in range(50):
        image_id, rles = real[int(rng.integers(len(real)))]
        rows = []
        for rle_str in rles:
            try:
                m = rle.decode(rle_str, (1024, 1024), fmt="relative")
            except rle.RLEError as err:
                raise SynthError(f"{path}: ImageId {image_id}: {err}") from None
            if size != 1024:
                m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
            if m.any():
                rows.append(m)
        if rows:
            return rows
    raise SynthError(f"{path}: the sampled masks vanish at {size} px; use a larger --size")


# --------------------------------------------------------------------------------------------
# DICOM and CSV writing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Meta:
    study: str
    series: str
    sop: str
    patient_id: str
    sex: str
    age: int
    view: str
    spacing: float


def _uid(kind: int, seed: int, split: int, index: int) -> str:
    """``ROOT.<kind>.<seed>.<split><index:06d>``: unique per (kind, seed, split, index)."""
    return f"{UID_ROOT}.{kind}.{seed}.{split}{index:06d}"


def _encode_jpeg(image: np.ndarray) -> bytes:
    """``(H, W) uint8`` -> baseline grayscale JPEG bytes (quality 95)."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="JPEG", quality=95, optimize=False,
                                          progressive=False)
    return buf.getvalue()


def _write_dicom(path: Path, image: np.ndarray, meta: _Meta) -> None:
    """Write one 8-bit MONOCHROME2 JPEG-Baseline DICOM with the tags of the real SIIM files."""
    from pydicom import config as dcm_config
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    fm.MediaStorageSOPInstanceUID = meta.sop
    fm.TransferSyntaxUID = JPEG_BASELINE
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = meta.sop
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {meta.view}"
    ds.PatientName = meta.patient_id
    ds.PatientID = meta.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = meta.sex
    # The real files store the age as a bare number ("38"), not the AS form "038Y".
    ds.add(DataElement(0x00101010, "AS", str(meta.age), validation_mode=dcm_config.IGNORE))
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = meta.view
    ds.StudyInstanceUID = meta.study
    ds.SeriesInstanceUID = meta.series
    ds.StudyID = ""
    ds.SeriesNumber = "1"
    ds.InstanceNumber = "1"
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.PixelSpacing = [f"{meta.spacing:.6g}", f"{meta.spacing:.6g}"]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.add(DataElement(0x7FE00010, "OB", encapsulate([_encode_jpeg(image)])))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise SynthError(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise SynthError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _image_rng(seed: int, split: int, index: int) -> np.random.Generator:
    """Image ``index`` of ``split`` gets the same stream whatever the dataset size."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split, index)))


def _write_split(root: Path, split: str, n: int, *, size: int, positive_rate: float,
                 seed: int, real: list[tuple[str, list[str]]] | None,
                 masks_from: Path | None) -> list[tuple[str, list[str]]]:
    """Render and write ``n`` DICOMs of ``split``; returns ``[(sop, [rle rows])]`` in order."""
    code = _SPLITS[split]
    folder = root / (TRAIN_DIR if split == "train" else TEST_DIR)
    folder.mkdir()
    labels = []
    patient: tuple[str, str, int] | None = None
    for i in range(n):
        rng = _image_rng(seed, code, i)
        positive = bool(rng.random() < positive_rate)
        # Patient identity: sometimes the previous image's patient (a follow-up film), so that
        # folds must be grouped by patient. All draws happen in every case to keep the stream.
        follow_up = rng.random() < 0.15
        new_patient = (str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                       "M" if rng.random() < 0.55 else "F", int(rng.integers(18, 90)))
        if patient is None or not follow_up:
            patient = new_patient
        view = "PA" if rng.random() < 0.6 else "AP"
        spacing = _SPACINGS[int(rng.integers(len(_SPACINGS)))] * 1024 / size
        real_rows = _sample_real_rows(rng, real, size, masks_from) if (
            positive and real is not None) else None
        rendered = _render(rng, size, positive, real_rows)
        meta = _Meta(study=_uid(2, seed, code, i), series=_uid(3, seed, code, i),
                     sop=_uid(4, seed, code, i), patient_id=patient[0], sex=patient[1],
                     age=patient[2], view=view, spacing=spacing)
        _write_dicom(folder / meta.study / meta.series / f"{meta.sop}.dcm", rendered.image, meta)
        labels.append((meta.sop, [rle.encode(m, fmt="relative") for m in rendered.rows]))
    return labels


def synthesize(out: Path, *, n_train: int = 200, n_test: int = 50, size: int = 1024,
               positive_rate: float = 0.22, seed: int = 0,
               masks_from: Path | None = None) -> str:
    """Write a synthetic dataset in the exact SIIM-ACR Kaggle layout into ``out``.

    Args:
        out: folder to create; it must not exist or be empty. The dataset is written into a
            sibling ``<out>.tmp-*`` folder and renamed at the end, so ``out`` is never half
            written.
        n_train: labelled training images (>= 1).
        n_test: unlabelled test images (>= 0); listed in ``sample_submission.csv``.
        size: image side in pixels (64..4096; SIIM is 1024).
        positive_rate: probability that an image has a pneumothorax, in (0, 1).
        seed: non-negative random seed; the same seed gives byte-identical files.
        masks_from: optional SIIM label CSV (``.csv`` or ``.csv.gz``) whose real positive mask
            shapes are used instead of procedural ones.

    Returns:
        A one-line summary, e.g. ``"wrote 200 train (44 positive, 51 annotation rows) + 50 test
        DICOMs to data/synth"``.

    Raises:
        SynthError: bad arguments, an existing non-empty ``out``, an unusable ``masks_from``.
    """
    n_train = _check_int("n_train", n_train, 1, 1_000_000)
    n_test = _check_int("n_test", n_test, 0, 1_000_000)
    size = _check_int("size", size, 64, 4096)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    try:
        positive_rate = float(positive_rate)
    except (TypeError, ValueError):
        raise SynthError(f"positive_rate must be a number, got {positive_rate!r}") from None
    if not 0.0 < positive_rate < 1.0:
        raise SynthError(f"positive_rate must be in (0, 1), got {positive_rate}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise SynthError(f"{out}: folder exists and is not empty; refusing to overwrite it")
    real = None
    if masks_from is not None:
        masks_from = Path(masks_from)
        real = _load_real_masks(masks_from)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        common = dict(size=size, positive_rate=positive_rate, seed=seed, real=real,
                      masks_from=masks_from)
        train = _write_split(tmp, "train", n_train, **common)
        test = _write_split(tmp, "test", n_test, **common)
        # Same header, value and line formatting as the real train-rle.csv / sample
        # submission (no quoting, "-1" for an empty image, one row per annotation).
        lines = ["ImageId, EncodedPixels"]
        for sop, rows in train:
            lines.extend(f"{sop},{r}" for r in rows or ["-1"])
        (tmp / LABELS_CSV).write_text("\n".join(lines) + "\n", newline="\n")
        sub = ["ImageId,EncodedPixels"] + [f"{sop},-1" for sop, _ in test]
        (tmp / SUBMISSION_CSV).write_text("\n".join(sub) + "\n", newline="\n")
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename cannot replace a folder portably
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_pos = sum(1 for _, rows in train if rows)
    n_rows = sum(len(rows) for _, rows in train)
    return (f"wrote {n_train} train ({n_pos} positive, {n_rows} annotation rows) + "
            f"{n_test} test DICOMs to {out}")
