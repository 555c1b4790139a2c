"""The command line's small languages, parsed once at the edge into typed values.

Fold lists (``all``, ``0,2``), value grids (``0.3:0.6``, ``0.3:0.6:0.05``, ``0.3,0.5``) and
TTA scales (``1,0.75,1.25``). The library takes the parsed values; malformed text is a
one-line :class:`TfpneumoError` naming the option.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from tfpneumo.errors import TfpneumoError

MAX_GRID = 10_000  # a guard against "0:1:1e-9" eating the memory


def parse_folds(text: str, option: str = "--folds") -> Literal["all"] | list[int]:
    """``"all"`` or comma-separated fold indices >= 0 (sorted, unique)."""
    raw = str(text).strip()
    if raw.lower() == "all":
        return "all"
    try:
        values = sorted({int(x) for x in raw.split(",") if x.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 0:
        raise TfpneumoError(f"{option} {text!r}: expected 'all' or fold indices like 0,2")
    return values


def parse_merges(text: str, option: str = "--merges") -> tuple[str, ...]:
    """``"all"`` or comma-separated merge names (:data:`tfpneumo.evaluation.rules.MERGES`),
    returned in that order."""
    from tfpneumo.evaluation.rules import MERGES

    raw = str(text).strip()
    if raw.lower() == "all":
        return MERGES
    names = {x.strip() for x in raw.split(",") if x.strip()}
    unknown = sorted(names - set(MERGES))
    if not names or unknown:
        raise TfpneumoError(f"{option} {text!r}: expected 'all' or some of {','.join(MERGES)}")
    return tuple(m for m in MERGES if m in names)


def parse_grid(text: str, name: str) -> np.ndarray:
    """A grid option: ``"start:stop[:step]"`` (stop included, step 0.05) or ``"0.3,0.5"``.

    Returns the sorted unique values, (K,) float64, rounded to 10 decimals so that float
    error in ``start + i * step`` never drops the stop (``0.3:0.6`` ends on 0.6) nor creates
    near-duplicates. Malformed text raises :class:`TfpneumoError` naming ``name`` and ``text``.
    """
    raw = str(text).strip()

    def fail(problem: str) -> TfpneumoError:
        return TfpneumoError(f"{name} {text!r}: {problem}")

    def number(part: str) -> float:
        try:
            value = float(part)
        except ValueError:
            raise fail(f"{part.strip()!r} is not a number") from None
        if not math.isfinite(value):
            raise fail(f"{part.strip()!r} is not a finite number")
        return value

    if not raw:
        raise fail("empty; expected start:stop[:step] or a comma list like 0.3,0.5")
    if ":" in raw:
        if "," in raw:
            raise fail("use either start:stop[:step] or a comma list, not both")
        parts = raw.split(":")
        if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
            raise fail("expected start:stop or start:stop:step")
        start, stop = number(parts[0]), number(parts[1])
        step = number(parts[2]) if len(parts) == 3 else 0.05
        if step <= 0:
            raise fail("step must be > 0")
        if start > stop:
            raise fail("start must be <= stop")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > MAX_GRID:
            raise fail(f"{count} values; at most {MAX_GRID}")
        values = start + step * np.arange(count, dtype=np.float64)
    else:
        parts = raw.split(",")
        if not all(p.strip() for p in parts):
            raise fail("empty item in the comma list")
        if len(parts) > MAX_GRID:
            raise fail(f"{len(parts)} values; at most {MAX_GRID}")
        values = np.array([number(p) for p in parts], dtype=np.float64)
    return np.unique(np.round(values, 10))


def probability_grid(text: str, name: str) -> np.ndarray:
    """:func:`parse_grid` of probabilities: every value in [0, 1]."""
    values = parse_grid(text, name)
    if values.min() < 0.0 or values.max() > 1.0:
        raise TfpneumoError(f"{name} {text!r}: values must be in [0, 1]")
    return values


def area_grid(text: str, name: str) -> Literal["auto"] | np.ndarray:
    """``"auto"`` or whole pixel counts >= 0, (A,) int64."""
    if str(text).strip().lower() == "auto":
        return "auto"
    values = parse_grid(text, name)
    if values.min() < 0 or not np.all(values == np.round(values)):
        raise TfpneumoError(f"{name} {text!r}: values must be whole pixel counts >= 0")
    return values.astype(np.int64)


def parse_scales(text: str | Sequence[float], option: str = "--scales") -> tuple[float, ...]:
    """TTA scales as floats: the CLI's text ``"1.0,0.75,1.25"`` or a sequence."""
    raw = text if isinstance(text, str) else ",".join(map(str, text))
    try:
        values = tuple(float(s) for s in raw.split(",") if s.strip())
    except ValueError:
        values = ()
    if not values or any(not math.isfinite(s) or s <= 0 for s in values):
        raise TfpneumoError(f"{option} {raw!r}: expected positive scales like 1.0,0.75,1.25")
    return values


def parse_workers(text: str, index: int | None, option: str = "--workers") -> str:
    """``"host1:port,host2:port"`` and this process's ``index`` -> the ``TF_CONFIG`` JSON of a
    MultiWorkerMirroredStrategy cluster (worker 0 is the chief). Every process gets the same
    list in the same order and its own index."""
    import json

    hosts = [h.strip() for h in str(text).split(",") if h.strip()]
    for host in hosts:
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise TfpneumoError(f"{option} {text!r}: {host!r} is not host:port (port 1-65535)")
    if len(set(hosts)) != len(hosts):
        raise TfpneumoError(f"{option} {text!r}: a worker is listed twice")
    if len(hosts) < 2:
        raise TfpneumoError(f"{option} {text!r}: name at least two workers (host:port,host:port)")
    if index is None or not 0 <= index < len(hosts):
        raise TfpneumoError(f"--worker-index {index}: expected 0..{len(hosts) - 1}, this "
                            f"process's place in {option}")
    return json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})
