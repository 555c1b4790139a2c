"""Synthetic chest radiographs, part 2: drawing the anatomy and a pneumothorax into pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import cv2
import numpy as np

from tfpneumo.data.synth.anatomy import (
    _Anatomy,
    _cage_field,
    _Collapse,
    _fit_lungs,
    _lateral_profile,
    _lung_field,
    _lung_field_at,
    _reshape,
    _sample_anatomy,
    _sample_collapse,
    _sigmoid,
    _smoothstep,
)
from tfpneumo.data.synth.looks import LOOKS, Look

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
            real_rows: list[np.ndarray] | None, look: Look = LOOKS["standard"]) -> _Rendered:
    """One radiograph ``(size, size) uint8`` and its annotation masks (empty list if negative).

    ``look`` (:mod:`.looks`) styles it; its neutral knobs leave every operation as it was.
    """
    gs = min(size, 256)  # smooth anatomy
    gm = min(size, 512)  # ribs, vessels, pleural line
    # Reshaped before the real masks are fitted, so that they still end up inside the lungs.
    an = _reshape(_sample_anatomy(rng), look.lung_width, look.lung_height, look.body_margin)
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
    lung_tissue = (rng.uniform(0.1, 0.15) * vessels + tissue) * lung_m * look.vessel_contrast

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
            sigma = 1.0 / gm * look.pleural_width
            pleura = np.maximum(pleura, np.exp(-0.5 * (dist / sigma) ** 2) * inner)
        rows = [m for m in rows if m.any()]

    amp_line = rng.uniform(0.1, 0.16) * look.pleural_line
    dens_m = (dens_m + rng.uniform(0.09, 0.14) * (ribs * cage_m + clavicles * body_m)
              + lung_tissue * (1.0 - ptx_soft)
              - (rng.uniform(0.02, 0.04) + rng.uniform(0.3, 0.45) * edge_m) * ptx_soft
              * look.ptx_dark
              + collapsed_dense + amp_line * pleura)

    # --- exposure, response, noise ----------------------------------------------------------
    k = rng.uniform(1.2, 1.9)
    img = (1.0 - np.exp(-k * np.maximum(dens_m, 0.0))) / (1.0 - math.exp(-k * 1.35))
    lo, hi = rng.uniform(0.0, 0.15), rng.uniform(0.92, 1.1)
    img = np.clip((img - lo) / (hi - lo), 0.0, 1.0) ** (rng.uniform(0.75, 1.3) * look.gamma)
    if look.contrast != 1.0:
        img = 0.5 + look.contrast * (img - 0.5)  # clipped with the noise, below
    img = _resize(img.astype(np.float32), size)
    px = size / 1024  # the look's lengths are in pixels at 1024 px
    if look.blur:
        img = cv2.GaussianBlur(img, (0, 0), look.blur * px)
    if look.edge_enhance:
        img = img + look.edge_enhance * (img - cv2.GaussianBlur(img, (0, 0), 8.0 * px))
    noise_sd = rng.uniform(0.006, 0.018) * look.noise
    if look.grain:
        # Correlated grain, rescaled to ``noise_sd`` after the smoothing.
        grain = cv2.GaussianBlur(rng.standard_normal((size, size), np.float32), (0, 0),
                                 look.grain * px)
        img = img + noise_sd / float(grain.std() + 1e-6) * grain
    else:
        # Uniform noise: a normal draw of 1024^2 values costs ~20 ms, a uniform one ~3 ms.
        img = img + (noise_sd * math.sqrt(12.0)) * (rng.random((size, size), np.float32) - 0.5)
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return _Rendered(out, rows, lung_any.astype(np.float32))
