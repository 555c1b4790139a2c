"""The cache's ``manifest.json``: the one reader of what a prepared cache is.

``tfpneumo prepare`` writes it last (:func:`write_manifest`); training, evaluation, submission
and the input pipeline learn the cached image side, the number of folds, whether CLAHE was
applied and the source data folder from :func:`read_cache_info` and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfpneumo.errors import TfpneumoError
from tfpneumo.files import write_json

MANIFEST = "manifest.json"


class CacheError(TfpneumoError):
    """The folder is not a usable prepared cache."""


@dataclass(frozen=True)
class CacheInfo:
    """What a prepared cache holds: square ``size`` px images in ``folds`` folds."""

    path: Path
    size: int
    folds: int
    clahe: bool
    data_dir: Path | None  # the SIIM folder it was prepared from

    def check_fold(self, fold: int) -> None:
        if not 0 <= fold < self.folds:
            raise CacheError(f"fold {fold}: the cache {self.path} has folds 0..{self.folds - 1}")


def read_cache_info(cache: str | Path) -> CacheInfo:
    """Reads ``<cache>/manifest.json``; a missing or malformed one is a one-line error."""
    path = Path(cache) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{cache}: no prepared cache here ({MANIFEST} missing); run "
                         "`tfpneumo prepare` or set data.cache")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable cache manifest ({type(e).__name__})") from e
    if not isinstance(data, dict):
        raise CacheError(f"{path}: a cache manifest must be a JSON object")
    size, folds = data.get("size"), data.get("folds")
    if not (isinstance(size, int) and size > 0 and isinstance(folds, int) and folds > 0):
        raise CacheError(f"{path}: size and folds must be positive integers "
                         f"(got {size!r}, {folds!r})")
    data_dir = data.get("data_dir")
    return CacheInfo(path=Path(cache), size=size, folds=folds, clahe=bool(data.get("clahe", False)),
                     data_dir=Path(data_dir) if isinstance(data_dir, str) and data_dir else None)


def find_cache_info(cache: str | Path) -> CacheInfo | None:
    """:func:`read_cache_info`, or None when the folder holds no usable manifest."""
    try:
        return read_cache_info(cache)
    except CacheError:
        return None


def write_manifest(cache: str | Path, *, size: int, folds: int, clahe: bool,
                   **details: Any) -> dict:
    """Writes ``manifest.json`` atomically: the facts above plus ``details`` (counts, shards,
    skipped files, ...). Returns the written dict."""
    data = {"size": int(size), "folds": int(folds), "clahe": bool(clahe), **details}
    write_json(Path(cache) / MANIFEST, data)
    return data
