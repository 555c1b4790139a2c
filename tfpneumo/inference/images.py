"""Test DICOMs in, batches of network images out, decoded like the cache was."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfpneumo.data.dicom import MAX_DICOM_MIB, read_dicom, read_header
from tfpneumo.data.labels import check_id
from tfpneumo.data.preprocess import network_image
from tfpneumo.errors import TfpneumoError


def load_image(path: Path, size: int, clahe: bool = False,
               max_mib: float = MAX_DICOM_MIB) -> tuple[np.ndarray, np.ndarray]:
    """One DICOM as the network sees it: ``(size, size) uint8`` (resampled like the cache;
    a non-square image is squashed) and its original ``(H, W) uint8`` pixels. Raises
    DicomError naming the file (also one larger than ``max_mib`` MiB decoded)."""
    pixels, _ = read_dicom(path, max_mib)
    return network_image(pixels, size, clahe), pixels


@dataclass
class Batch:
    """``ids`` (B,), ``images`` (B, size, size) uint8, ``originals`` B arrays (H, W) uint8."""

    ids: list[str]
    images: np.ndarray
    originals: list[np.ndarray]


def image_batches(items: Sequence[tuple[str, Path]], size: int, batch_size: int,
                  clahe: bool = False, max_mib: float = MAX_DICOM_MIB) -> Iterator[Batch]:
    """Batches of decoded images in the order of ``items`` (id, path); the next batch is read
    in a background thread while the caller predicts the current one (at most two batches
    in memory)."""

    def load(chunk: Sequence[tuple[str, Path]]) -> Batch:
        loaded = [load_image(path, size, clahe, max_mib) for _, path in chunk]
        return Batch([image_id for image_id, _ in chunk], np.stack([a for a, _ in loaded]),
                     [b for _, b in loaded])

    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, chunks[0])
        for k in range(len(chunks)):
            batch = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(load, chunks[k + 1])
            yield batch


def dicom_items(files: Sequence[Path], max_mib: float = MAX_DICOM_MIB) -> list[tuple[str, Path]]:
    """(id, path) per file; the id is the file name without ``.dcm``. Unreadable files (or
    larger than ``max_mib`` MiB decoded), unusable or repeated ids raise naming the file,
    before any model is loaded."""
    items, seen = [], {}
    for path in map(Path, files):
        read_header(path, max_mib)  # cheap (~1 ms): a non-DICOM fails here, naming the file
        image_id = path.name[:-4] if path.name.lower().endswith(".dcm") else path.name
        reason = check_id(image_id)
        if reason is not None:
            raise TfpneumoError(f"{path}: {reason}")
        if image_id in seen:
            raise TfpneumoError(f"{path}: image id {image_id} also comes from {seen[image_id]}; "
                                "the outputs would overwrite each other")
        seen[image_id] = path
        items.append((image_id, path))
    return items
