"""The training cache format: sharded TFRecords that tf.data reads with no Python in the loop.

A cache folder written by ``tfpneumo prepare`` holds::

    prepare.yaml                 resolved config of the prepare run
    manifest.json                counts, size, folds, shard list, every skipped file and why
    index.csv                    one row per image: image_id, split, fold, has_mask, n_rows,
                                 patient_id, patient_age, patient_sex, view_position, shard
    train-f{fold}-{pos|neg}-{k:05d}.tfrecord   labelled images, grouped by fold and class
    test-{k:05d}.tfrecord                      unlabelled test images
    <shard>.tfrecord.json        sidecar written after its shard: ids and skips of that shard

Grouping training shards by fold and class lets the pipeline draw positives and negatives
from separate streams (the positive-sample-rate schedule) and read one fold for validation
without filtering every record. A shard counts as complete only once its sidecar exists;
both are written to a temporary name and renamed, so a killed run never leaves half a shard.

Each record (a ``tf.train.Example``):

=========  =======  ==========================================================
image_id   bytes    the SOPInstanceUID / file stem
image      bytes    raw uint8 pixels, row-major, ``height * width`` bytes
mask       bytes    PNG of the merged mask (values 0/1); empty for test images
height     int64    cached image height (== width == prepare.size)
width      int64
has_mask   int64    1 positive, 0 negative, -1 unknown (test)
fold       int64    0..folds-1; -1 for test images
n_rows     int64    annotation rows in the label CSV (0 for negatives and test)
=========  =======  ==========================================================
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

SHARD_RE = re.compile(r"^(?:train-f(?P<fold>\d+)-(?P<cls>pos|neg)|test)-(?P<k>\d{5})\.tfrecord$")


def train_shard_name(fold: int, positive: bool, k: int) -> str:
    return f"train-f{fold}-{'pos' if positive else 'neg'}-{k:05d}.tfrecord"


def test_shard_name(k: int) -> str:
    return f"test-{k:05d}.tfrecord"


def sidecar_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".json")


def list_shards(cache: str | Path, split: str, folds: set[int] | None = None,
                positive: bool | None = None) -> list[str]:
    """Complete shards (sidecar present) of ``split`` ("train" or "test"), sorted.

    ``folds`` keeps only those folds; ``positive`` keeps only the positive (True) or
    negative (False) shards. Both are ignored for the test split.
    """
    out = []
    for path in sorted(Path(cache).glob("*.tfrecord")):
        m = SHARD_RE.match(path.name)
        if not m or not sidecar_path(path).exists():
            continue
        is_test = m.group("fold") is None
        if (split == "test") != is_test:
            continue
        if not is_test:
            if folds is not None and int(m.group("fold")) not in folds:
                continue
            if positive is not None and (m.group("cls") == "pos") != positive:
                continue
        out.append(str(path))
    return out


def serialize_example(image_id: str, image: np.ndarray, mask: np.ndarray | None,
                      has_mask: int, fold: int, n_rows: int) -> bytes:
    """One record. ``image`` (H, W) uint8; ``mask`` (H, W) uint8 0/1 or None for test images."""
    import tensorflow as tf

    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"{image_id}: image must be (H, W) uint8, got {image.shape} {image.dtype}")
    height, width = image.shape
    mask_png = b""
    if mask is not None:
        if mask.shape != image.shape:
            raise ValueError(f"{image_id}: mask shape {mask.shape} != image shape {image.shape}")
        mask_png = tf.io.encode_png(mask.astype(np.uint8)[..., None], compression=1).numpy()

    def b(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def i(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    features = {
        "image_id": b(image_id.encode()),
        "image": b(np.ascontiguousarray(image).tobytes()),
        "mask": b(mask_png),
        "height": i(height),
        "width": i(width),
        "has_mask": i(has_mask),
        "fold": i(fold),
        "n_rows": i(n_rows),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def feature_spec() -> dict:
    import tensorflow as tf

    return {
        "image_id": tf.io.FixedLenFeature([], tf.string),
        "image": tf.io.FixedLenFeature([], tf.string),
        "mask": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "has_mask": tf.io.FixedLenFeature([], tf.int64),
        "fold": tf.io.FixedLenFeature([], tf.int64),
        "n_rows": tf.io.FixedLenFeature([], tf.int64),
    }


def parse_example(serialized):
    """Graph-mode parse of one record.

    Returns a dict: ``image`` (H, W, 1) uint8, ``mask`` (H, W, 1) uint8 0/1 (zeros for test
    images), ``image_id`` string, ``has_mask`` int64, ``fold`` int64.
    """
    import tensorflow as tf

    ex = tf.io.parse_single_example(serialized, feature_spec())
    height = tf.cast(ex["height"], tf.int32)
    width = tf.cast(ex["width"], tf.int32)
    image = tf.reshape(tf.io.decode_raw(ex["image"], tf.uint8), [height, width, 1])
    mask = tf.cond(
        tf.strings.length(ex["mask"]) > 0,
        lambda: tf.reshape(tf.io.decode_png(ex["mask"], channels=1), [height, width, 1]),
        lambda: tf.zeros([height, width, 1], tf.uint8),
    )
    return {"image": image, "mask": mask, "image_id": ex["image_id"],
            "has_mask": ex["has_mask"], "fold": ex["fold"]}
