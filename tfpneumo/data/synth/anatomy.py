"""Synthetic chest radiographs, part 1: the anatomy (lungs, rib cage, collapses) as geometry."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

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


def _reshape(an: _Anatomy, lung_width: float, lung_height: float,
             body_margin: float) -> _Anatomy:
    """Scale the lungs' width and height and the soft tissue outside them (a look's geometry).

    Apices and medial borders stay put; the bases, hila and heart move with the height, the
    body's edge with the lungs' outer edge. All 1.0 returns ``an`` itself.
    """
    if (lung_width, lung_height, body_margin) == (1.0, 1.0, 1.0):
        return an
    lungs = []
    for lung in an.lungs:
        base = min(lung.top + (lung.base - lung.top) * lung_height, 0.93)
        ratio = (base - lung.top) / (lung.base - lung.top)
        hilum = (lung.hilum[0], lung.top + (lung.hilum[1] - lung.top) * ratio)
        lungs.append(replace(lung, base=base, width=lung.width * lung_width, hilum=hilum))
    outer_old = max(lu.wm + lu.width for lu in an.lungs)
    outer_new = max(lu.wm + lu.width for lu in lungs)
    hx, hy, hrx, hry, hang = an.heart
    hy += lungs[1].base - an.lungs[1].base  # the heart sits on the diaphragm
    return replace(an, lungs=(lungs[0], lungs[1]), heart=(hx, hy, hrx, hry, hang),
                   body_hw=outer_new + (an.body_hw - outer_old) * body_margin)
