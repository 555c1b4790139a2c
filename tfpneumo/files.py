"""Writing files so that a reader never sees half of one: a temporary file, then a rename.

A run killed at any moment (kill -9, a full disk) leaves either the old file or the new one,
plus at most a ``*.tmp`` file that the next run overwrites. Every artefact of tfpneumo
(configs, shards, manifests, checkpoints, run state, OOF statistics, evaluations,
submissions) is written through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` when the block ends.

    The temporary is ``<name>.tmp``, or ``tmp-<name>`` with ``keep_suffix`` for writers that
    insist on an ending (Keras' ``save_weights`` wants ``.weights.h5``). On an exception the
    temporary is removed and ``path`` is left as it was. The parent folder must exist.
    """
    path = Path(path)
    tmp = path.with_name(f"tmp-{path.name}" if keep_suffix else f"{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON with a final newline."""
    write_text(path, json.dumps(data, indent=1) + "\n")


def write_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """``np.savez`` of ``arrays`` (uncompressed) under exactly the name ``path``."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: no ".npz" appended
        np.savez(f, **arrays)
