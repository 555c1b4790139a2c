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

from tfpneumo.errors import TfpneumoError, first_line
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
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CacheError(f"{path}: unreadable cache manifest ({first_line(e, 120)}); rerun "
                         "`tfpneumo prepare`") from e
    if not isinstance(data, dict):
        raise CacheError(f"{path}: a cache manifest must be a JSON object, not "
                         f"{_json_type(data)}; rerun `tfpneumo prepare`")
    for key in ("size", "folds"):
        value = data.get(key)
        if key not in data:
            raise CacheError(f"{path}: key {key!r} missing; rerun `tfpneumo prepare`")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CacheError(f"{path}: {key} must be a positive integer, not "
                             f"{_short(value)}; rerun `tfpneumo prepare`")
    clahe = data.get("clahe", False)
    if not isinstance(clahe, bool):
        raise CacheError(f"{path}: clahe must be true or false, not {_short(clahe)}; rerun "
                         "`tfpneumo prepare`")
    data_dir = data.get("data_dir")
    if data_dir is not None and not isinstance(data_dir, str):
        raise CacheError(f"{path}: data_dir must be a folder name, not {_short(data_dir)}; "
                         "rerun `tfpneumo prepare`")
    return CacheInfo(path=Path(cache), size=data["size"], folds=data["folds"], clahe=clahe,
                     data_dir=Path(data_dir) if data_dir else None)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "?")


def _short(value: Any) -> str:
    """``value`` in JSON, cut to a few characters (a manifest may hold anything)."""
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):
        text = _json_type(value)
    return text if len(text) <= 40 else text[:40] + "..."


def find_cache_info(cache: str | Path) -> CacheInfo | None:
    """:func:`read_cache_info`, or None when the folder holds no manifest (predicting without
    the cache). A manifest that is there but malformed is an error: falling back to the
    config would silently preprocess otherwise than the cache the networks learned from."""
    if not (Path(cache) / MANIFEST).exists():
        return None
    return read_cache_info(cache)


def write_manifest(cache: str | Path, *, size: int, folds: int, clahe: bool,
                   **details: Any) -> dict:
    """Writes ``manifest.json`` atomically: the facts above plus ``details`` (counts, shards,
    skipped files, ...). Returns the written dict."""
    data = {"size": int(size), "folds": int(folds), "clahe": bool(clahe), **details}
    write_json(Path(cache) / MANIFEST, data)
    return data
