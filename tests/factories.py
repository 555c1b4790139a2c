"""Test data shared by several test modules: tiny TFRecord caches and tiny trained runs."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

import tfpneumo  # noqa: F401  (sets SM_FRAMEWORK before segmentation_models is imported)
from tfpneumo.config import Config, ModelConfig, load_config, replace
from tfpneumo.data import records
from tfpneumo.data.manifest import write_manifest

PRED_SIZE = 128  # small prediction size keeps the tests fast; masks are still 1024x1024

# ----------------------------------------------------------------------------- tiny caches

SIZE = 64
# (fold, positive) -> number of images; shard_size 10 gives several shards per group.
COUNTS = {(0, True): 16, (0, False): 24, (1, True): 12, (1, False): 28}
N_TEST = 6
OFF = {"hflip": 0.0, "color_p": 0.0, "affine_p": 0.0}


def make_image(index: int, fold: int, positive: bool,
               texture: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Background 60; row 0 holds the index (base 256) at cols 0-1; pixel (63, 0) = 100 + fold;
    pixel (63, 63) = 128 in every image; positives get a 240 rectangle = the mask.

    ``texture``: grain (sd 20, seeded by the index) on every pixel but those: flat images make
    BatchNorm variances E[x^2] - E[x]^2 of nearly equal numbers, which float32 gets wrong."""
    image = np.full((SIZE, SIZE), 60, np.uint8)
    if texture:
        grain = np.random.default_rng(index).normal(0.0, 20.0, (SIZE, SIZE))
        image = np.clip(np.rint(60.0 + grain), 0, 200).astype(np.uint8)
    image[0, 0], image[0, 1] = index // 256, index % 256
    image[SIZE - 1, 0] = 100 + fold
    image[SIZE - 1, SIZE - 1] = 128
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if positive:
        y, x = 8 + index % 20, 6 + (3 * index) % 20
        image[y:y + 20, x:x + 16] = image[y:y + 20, x:x + 16] // 4 + 190 if texture else 240
        mask[y:y + 20, x:x + 16] = 1
    return image, mask


def write_shards(cache: Path, groups: dict[tuple[int, bool], int], shard_size: int = 10,
                 n_test: int = 0, texture: bool = False) -> dict[str, tuple[int, bool]]:
    """Writes train (and test) shards with sidecars; returns id -> (fold, positive)."""
    import tensorflow as tf

    cache.mkdir(parents=True, exist_ok=True)
    index, truth = 0, {}

    def flush(path: Path, examples: list[tuple[str, bytes]]) -> None:
        with tf.io.TFRecordWriter(str(path)) as writer:
            for _, ex in examples:
                writer.write(ex)
        records.sidecar_path(path).write_text(
            json.dumps({"ids": [i for i, _ in examples], "skipped": []}))

    for (fold, positive), n in sorted(groups.items()):
        examples = []
        for _ in range(n):
            image, mask = make_image(index, fold, positive, texture)
            image_id = f"id{index:04d}"
            examples.append((image_id, records.serialize_example(
                image_id, image, mask, int(positive), fold, int(positive))))
            truth[image_id] = (fold, positive)
            index += 1
        for k in range(0, n, shard_size):
            flush(cache / records.train_shard_name(fold, positive, k // shard_size),
                  examples[k:k + shard_size])
    write_manifest(cache, size=SIZE, folds=1 + max((f for f, _ in groups), default=0), clahe=False)
    if n_test:
        examples = []
        for _ in range(n_test):
            image, _ = make_image(index, -1, False)
            image_id = f"id{index:04d}"
            examples.append((image_id, records.serialize_example(image_id, image, None, -1, -1,
                                                                 0)))
            index += 1
        flush(cache / records.test_shard_name(0), examples)
    return truth


def cfg_with(**data) -> Config:
    augment = data.pop("augment", {})
    base = {"image_size": SIZE, "batch_size": 8, "shuffle_buffer": 32}
    return replace(Config(), data={**base, **data}, augment=augment)


def decode_index(images: np.ndarray) -> np.ndarray:
    """Index written in row 0 of each un-augmented image (grey pixels)."""
    grey = np.rint(np.asarray(images, np.float64)[:, 0, :2, 0]).astype(int)
    return grey[:, 0] * 256 + grey[:, 1]



# ----------------------------------------------------------------------------- tiny runs

@functools.lru_cache(maxsize=1)
def tiny_model_file() -> Path:
    """A random tiny UNet saved as .keras, built once per session (also used by test_predict)."""
    import keras

    from tfpneumo.models.unet import build_model

    keras.utils.set_random_seed(0)
    # mask_prior 0.5: probabilities spread around 0.5, so rules split the images both ways
    net = build_model(ModelConfig(encoder="resnet18", encoder_weights="none",
                                  decoder_filters=(16, 8, 8, 8, 8), mask_prior=0.5))
    folder = Path(tempfile.mkdtemp(prefix="tfpneumo-test-model-"))
    atexit.register(shutil.rmtree, folder, True)
    net.save(folder / "tiny.keras")
    return folder / "tiny.keras"


def make_run(workdir: Path, experiment: str = "tiny", folds: tuple[int, ...] = (0,),
             name: str = "best.keras"):
    """runs/<experiment>/fold_<k>/<name> + result.json for each fold; returns a config whose
    cache does not exist (so nothing is read from a manifest)."""
    for k in folds:
        fold = workdir / "runs" / experiment / f"fold_{k}"
        fold.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_model_file(), fold / name)
        (fold / "result.json").write_text(json.dumps({"fold": k}))
    return load_config(None, [f"experiment={experiment}", f"data.cache={workdir / 'no-cache'}",
                              f"data.image_size={PRED_SIZE}", "data.batch_size=4"])
