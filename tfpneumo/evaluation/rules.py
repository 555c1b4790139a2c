"""The decision rule: how probabilities become the mask that is submitted.

One type, :class:`Rule`, with two kinds, used by ``evaluate`` (which searches it), ``submit``,
``predict`` and the export (which apply it):

triplet (1st place)
    the image is positive when ``count(prob >= top) >= min_area``; its mask is
    ``prob >= bottom`` (``bottom <= top``). With ``top = bottom`` and ``min_area = 0`` this is
    the plain rule "mask = prob >= t".
label (classification head)
    the image is positive when ``label_prob > label_threshold`` and
    ``count(prob >= bottom) >= min_area``; its mask is ``prob >= bottom``.

``min_area`` is a pixel count at the resolution the rule is applied at; :meth:`Rule.at_pixels`
rescales it. ``>=`` on pixels is what the out-of-fold histograms count.

A rule also names how the ensemble's members (folds x TTA) become the one map it is applied
to, ``merge`` (:data:`MERGES`, implemented in :mod:`tfpneumo.inference.ensemble`): the
thresholds were searched on maps merged that way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tfpneumo import runs
from tfpneumo.errors import TfpneumoError, first_line

KINDS = ("triplet", "label")
MERGES = ("mean", "median", "geomean", "mask_median")  # see tfpneumo.inference.ensemble
NO_RULE = "no thresholds: run tfpneumo evaluate or pass --top/--min-area/--bottom"
_FLAGS = {"top": "--top", "min_area": "--min-area", "bottom": "--bottom",
          "label_threshold": "--label-threshold", "kind": "--rule", "merge": "--merge"}
_NEEDS = {"triplet": ("top", "bottom"), "label": ("label_threshold", "bottom")}


@dataclass(frozen=True)
class Rule:
    """A decision rule (see the module docstring); invalid values raise a one-line error."""

    kind: str
    bottom: float
    top: float | None = None
    min_area: int = 0
    label_threshold: float | None = None
    merge: str = "mean"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TfpneumoError(f"rule {self.kind!r}: expected one of {', '.join(KINDS)}")
        check_merge(self.merge)
        missing = [_FLAGS[k] for k in _NEEDS[self.kind] if getattr(self, k) is None]
        if missing:
            raise TfpneumoError(f"{NO_RULE} (the {self.kind} rule is missing {', '.join(missing)})")
        for key in ("top", "bottom", "label_threshold"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise TfpneumoError(f"threshold {key}={value!r} ({_FLAGS[key]}): must be in [0, 1]")
        if isinstance(self.min_area, bool) or not isinstance(self.min_area, (int, np.integer)) \
                or self.min_area < 0:
            raise TfpneumoError(f"min_area={self.min_area!r} ({_FLAGS['min_area']}): must be a "
                                "whole pixel count >= 0")

    # -- applying it to one probability map
    def gate(self, prob: np.ndarray, label_prob: float) -> bool:
        """Whether the image gets a mask at all. prob (H, W) float32 at the rule's resolution."""
        if self.kind == "label" and not label_prob > self.label_threshold:
            return False
        cut = self.top if self.kind == "triplet" else self.bottom
        return bool(np.count_nonzero(prob >= cut) >= self.min_area)

    def mask(self, prob: np.ndarray, label_prob: float,
             shape: tuple[int, int] | None = None) -> np.ndarray:
        """(H, W) bool mask; with ``shape``, at that size: the gate is decided on ``prob`` as
        given (where ``min_area`` holds), then the map is resized (bilinear) before
        ``prob >= bottom``, so edges are smooth, not blocky."""
        out_shape = prob.shape if shape is None else tuple(shape)
        if not self.gate(prob, label_prob):
            return np.zeros(out_shape, dtype=bool)
        return resize_prob(prob, out_shape) >= self.bottom

    # -- applying it to out-of-fold statistics
    def score_oof(self, stats) -> tuple[np.ndarray, np.ndarray]:
        """Per-image predicted area (N,) int64 and competition Dice (N,) float64 on
        :class:`~tfpneumo.evaluation.oof.OofStats`; thresholds act on the bin edges
        ``ceil(bins * t)`` (exact for the snapped values evaluate reports)."""
        from tfpneumo.evaluation.oof import counts_above, dice

        edge = _edge(self.bottom, stats.bins)
        truth = stats.hist_true.sum(axis=1, dtype=np.int64)
        area = counts_above(stats.hist_all, edge)[:, 0]
        inter = counts_above(stats.hist_true, edge)[:, 0]
        if self.kind == "triplet":
            positive = counts_above(stats.hist_all, _edge(self.top, stats.bins))[:, 0] >= self.min_area
        else:
            positive = (stats.label_prob.astype(np.float64) > self.label_threshold) & (
                area >= self.min_area)
        pred = np.where(positive, area, 0)
        return pred, dice(pred, np.where(positive, inter, 0), truth)

    # -- describing and storing it
    def at_pixels(self, pixels_from: int, pixels_to: int) -> Rule:
        """The rule with ``min_area`` rescaled from images of ``pixels_from`` to ``pixels_to``."""
        if pixels_from == pixels_to or not self.min_area:
            return self
        return replace(self, min_area=int(round(self.min_area / pixels_from * pixels_to)))

    def describe(self) -> str:
        merge = "" if self.merge == "mean" else f" merge={self.merge}"
        if self.kind == "triplet":
            return (f"triplet top={self.top:g} min_area={self.min_area} bottom={self.bottom:g}"
                    f"{merge}")
        return (f"label p>{self.label_threshold:g} bottom={self.bottom:g} "
                f"min_area={self.min_area}{merge}")

    def to_json(self) -> dict:
        return {"rule": self.kind, **{k: v for k, v in asdict(self).items() if k != "kind"}}

    @classmethod
    def from_json(cls, data: dict, where: str = "rule") -> Rule:
        """From :meth:`to_json` or an ``evaluation.json`` "best" entry (extra keys ignored)."""
        try:
            min_area = data.get("min_area") or 0
            if isinstance(min_area, float) and min_area.is_integer():
                min_area = int(min_area)
            return cls(kind=data["rule"], bottom=data["bottom"], top=data.get("top"),
                       min_area=min_area, label_threshold=data.get("label_threshold"),
                       merge=data.get("merge") or "mean")
        except (KeyError, TypeError, AttributeError) as e:
            raise TfpneumoError(f"{where}: not a rule ({first_line(e)})") from e


def check_merge(merge: str, flag: str = "--merge") -> str:
    """``merge`` when it names one of :data:`MERGES`, else a one-line error."""
    if merge not in MERGES:
        raise TfpneumoError(f"{flag} {merge!r}: expected one of {', '.join(MERGES)}")
    return merge


def _edge(threshold: float, bins: int) -> np.ndarray:
    """The histogram bin edge of a pixel threshold, as a (1,) index array."""
    return np.array([int(np.clip(np.ceil(threshold * bins - 1e-9), 0, bins))])


def resize_prob(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 probabilities resized (bilinear) to ``shape`` (H, W)."""
    if prob.shape == tuple(shape):
        return prob
    import cv2

    return cv2.resize(prob, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def resolve_rule(experiment: str, workdir: str | Path = ".", overrides: dict[str, Any] | None = None,
                 pixels: int | None = None, weights: str = "auto") -> tuple[Rule, str]:
    """The rule to apply at images of ``pixels`` pixels, and where it came from
    (``"evaluation.json"``, ``"options"`` or both).

    Base: ``best`` of ``runs/<experiment>/evaluation.json`` when present, its ``min_area``
    rescaled from the images it was searched on (``best.pixels``) to ``pixels``.
    ``overrides`` (keys kind, top, min_area, bottom, label_threshold, merge; None = not given)
    replace single values; an overriding ``min_area`` is already at ``pixels``. Without
    evaluation.json the kind is ``overrides["kind"]``, else label when label_threshold is
    given, else triplet (with ``top = bottom`` when no top is given: the plain rule).

    ``weights`` other than auto read ``evaluation_<kind>.json``: a rule is only used on the
    networks whose out-of-fold statistics chose it.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(_FLAGS)
    if unknown:
        raise TfpneumoError(f"unknown rule option(s) {sorted(unknown)}; expected {list(_FLAGS)}")
    path = runs.run_root(experiment, workdir) / runs.evaluation_names(weights)[0]
    base: dict[str, Any] = {}
    if path.is_file():
        best = _read_best(path)
        rule = Rule.from_json(best, f"{path}: best")
        searched_on = best.get("pixels")
        if pixels is not None and isinstance(searched_on, int) and searched_on > 0:
            rule = rule.at_pixels(searched_on, pixels)
        base = {k: v for k, v in asdict(rule).items() if v is not None}
    elif not overrides and weights != "auto":
        raise TfpneumoError(f"{path} not found: the rule for --weights {weights} comes from "
                            f"its own out-of-fold statistics; run tfpneumo evaluate --weights "
                            f"{weights} (or give the whole rule as options)")
    elif not overrides:
        raise TfpneumoError(NO_RULE)
    merged = {**base, **overrides}
    if "kind" not in merged:
        merged["kind"] = "label" if "label_threshold" in merged else "triplet"
    if merged["kind"] == "triplet" and "top" in merged and "min_area" not in merged:
        raise TfpneumoError(f"{NO_RULE} (the triplet rule is missing --min-area)")
    if merged["kind"] == "triplet" and "top" not in merged and "bottom" in merged:
        merged["top"] = merged["bottom"]
    if merged["kind"] != "triplet":
        merged.pop("top", None)
    if merged["kind"] != "label":
        merged.pop("label_threshold", None)
    if "bottom" not in merged:
        raise TfpneumoError(f"{NO_RULE} (the {merged['kind']} rule is missing --bottom)")
    source = (path.name if base and not overrides else
              "options" if not base else f"{path.name} + options")
    return Rule(**merged), source


def _read_best(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TfpneumoError(f"{path}: cannot read ({e.strerror or e})") from e
    except ValueError as e:
        raise TfpneumoError(f"{path}: not valid JSON ({first_line(e)})") from e
    best = data.get("best") if isinstance(data, dict) else None
    if not isinstance(best, dict):
        raise TfpneumoError(f"{path}: no 'best' entry; rerun tfpneumo evaluate")
    return best
