"""What the sections make up instead of reading: a prepared cache and an untrained network.

The cache is made as a user makes theirs: ``tfpneumo synth``'s generator writes SIIM-layout
DICOMs (JPEG Baseline, labels as RLE), then ``tfpneumo prepare``'s
:func:`~tfpneumo.data.prepare.prepare_cache` turns them into a cache with its manifest, so the
pipeline and service sections read exactly what training reads, made by the same code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

POSITIVE_RATE = 0.25  # with seed 0: 3 of the first 8 images, enough for 2 folds of each class
FOLDS = 2  # the least prepare allows; the sections read every fold (fold -1)
MIN_DICOM_SIZE = 64  # the least synthesize draws


def synthetic_dicoms(folder: Path, images: int, size: int, seed: int = 0) -> Path:
    """``images`` labelled DICOMs of ``size`` px (at least 64) in the SIIM layout, no test
    images, into the new folder ``folder``; returns it."""
    from tfpneumo.data.synth import synthesize

    synthesize(Path(folder), n_train=images, n_test=0, size=max(MIN_DICOM_SIZE, size),
               positive_rate=POSITIVE_RATE, seed=seed)
    return Path(folder)


def prepared_cache(dicoms: Path, cache: Path, size: int, *, shard_size: int = 50) -> Path:
    """``prepare_cache`` of ``dicoms`` into ``cache`` at ``size`` px in :data:`FOLDS` folds,
    ``shard_size`` images a shard, one worker (in this process: no spawn workers to start);
    returns ``cache``."""
    from tfpneumo.config import load_config, replace
    from tfpneumo.data.prepare import prepare_cache

    cfg = replace(load_config(None), prepare={"size": size, "folds": FOLDS,
                                              "shard_size": shard_size, "workers": 1})
    prepare_cache(dicoms, cache, cfg, progress=False)
    return Path(cache)


def synthetic_cache(folder: Path, size: int, images: int, *, shard_size: int = 50,
                    seed: int = 0) -> Path:
    """DICOMs of ``size`` px in ``folder/dicoms``, prepared into ``folder/cache``; returns the
    cache. At least about 8 images: prepare needs 2 of each class for 2 folds."""
    dicoms = synthetic_dicoms(Path(folder) / "dicoms", images, size, seed)
    return prepared_cache(dicoms, Path(folder) / "cache", size, shard_size=shard_size)


def base_model_config(cfg):
    """The network of ``cfg`` with random encoder weights (no download): the train and
    inference sections time the architecture, not trained weights."""
    import dataclasses

    return dataclasses.replace(cfg.model, encoder_weights="none")


# The PyTorch reference's layout (GUIDE.md): UNet-ResNet34 without attention or skip dropout,
# BCE on the mask of every image and on the label, AdamW.
REFERENCE_OVERRIDES = ["model.attention=none", "model.skip_dropout=0", "loss.mask=bce",
                       "loss.mask_positives_only=false"]


def random_batch(size: int, batch: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """``(x, y)``: x ``(B, S, S, 1) float32`` grey pixels in [0, 255] (what the model takes),
    y with ``mask (B, S, S, 1)`` rectangles on every other image and ``label (B, 1)``."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(batch, size, size, 1)).astype(np.float32)
    mask = np.zeros((batch, size, size, 1), np.float32)
    for i in range(0, batch, 2):
        top, left = rng.integers(0, size // 2, 2)
        mask[i, top:top + size // 4, left:left + size // 6] = 1.0
    return x, {"mask": mask, "label": mask.max(axis=(1, 2))}
