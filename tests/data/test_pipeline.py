"""tf.data builders on tiny hand-made caches (64 px) whose pixels encode id, fold and class."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from factories import COUNTS, N_TEST, OFF, SIZE, cfg_with, decode_index, make_image, write_shards  # noqa: F401

from tfpneumo.data import records
from tfpneumo.errors import TfpneumoError


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tf) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("cache")
    truth = write_shards(folder, COUNTS, n_test=N_TEST)
    # An incomplete shard (no sidecar) must be ignored.
    (folder / records.train_shard_name(0, True, 99)).write_bytes(b"garbage")
    return folder, truth


@pytest.fixture(scope="module")
def P(tf):
    from tfpneumo.data import pipeline

    return pipeline


def take(ds, n: int) -> list[tuple]:
    """First ``n`` elements as numpy tuples (a dict element becomes a 1-tuple)."""
    return [elem if isinstance(elem, tuple) else (elem,)
            for elem in ds.take(n).as_numpy_iterator()]


# ----------------------------------------------------------------------------- schedule

def test_positive_rate_closed_form(P):
    assert P.positive_rate(0, 5, 0.8, 0.4) == pytest.approx(0.8)
    assert P.positive_rate(1, 5, 0.8, 0.4) == pytest.approx(0.7)
    assert P.positive_rate(2, 5, 0.8, 0.4) == pytest.approx(0.6)
    assert P.positive_rate(4, 5, 0.8, 0.4) == pytest.approx(0.4)
    assert P.positive_rate(9, 5, 0.8, 0.4) == pytest.approx(0.4)  # past the end: clamped
    assert P.positive_rate(0, 1, 0.8, 0.4) == pytest.approx(0.8)  # one epoch: start
    assert P.positive_rate(3, 4, 0.2, 0.5) == pytest.approx(0.5)


def _share(labels: np.ndarray) -> float:
    return float(labels.mean())


def _binomial_tol(p: float, n: int) -> float:
    return 4.0 * math.sqrt(p * (1 - p) / n)


def test_schedule_shares_first_and_last_epoch(P, cache):
    folder, _ = cache
    cfg = cfg_with(positive_rate_start=0.8, positive_rate_end=0.2, augment=OFF)
    ds, steps = P.train_dataset(folder, -1, cfg, epochs=3, steps_per_epoch=50, seed=1)
    assert steps == 50
    labels = np.concatenate([y["label"][:, 0] for _, y in take(ds, 150)])
    n = 50 * 8
    first, mid, last = labels[:n], labels[n:2 * n], labels[2 * n:]
    assert abs(_share(first) - 0.8) < _binomial_tol(0.8, n)
    assert abs(_share(mid) - 0.5) < _binomial_tol(0.5, n)
    assert abs(_share(last) - 0.2) < _binomial_tol(0.2, n)


def test_schedule_resumes_at_initial_epoch(P, cache):
    folder, _ = cache
    cfg = cfg_with(positive_rate_start=0.8, positive_rate_end=0.2, augment=OFF)
    ds, _ = P.train_dataset(folder, -1, cfg, epochs=3, steps_per_epoch=50, seed=1,
                            initial_epoch=2)
    labels = np.concatenate([y["label"][:, 0] for _, y in take(ds, 50)])
    assert abs(_share(labels) - 0.2) < _binomial_tol(0.2, 400)


def test_positive_rate_one_gives_positives_only(P, cache):
    folder, _ = cache
    cfg = cfg_with(positive_rate_start=1.0, positive_rate_end=1.0, augment=OFF)
    ds, _ = P.train_dataset(folder, -1, cfg, epochs=2, steps_per_epoch=5, seed=3)
    labels = np.concatenate([y["label"][:, 0] for _, y in take(ds, 10)])
    assert labels.size == 80 and np.all(labels == 1.0)


def test_natural_ratio_without_schedule(P, cache):
    folder, _ = cache
    cfg = cfg_with(positive_rate_start=None, positive_rate_end=None, augment=OFF)
    ds, steps = P.train_dataset(folder, -1, cfg, epochs=2, seed=2)
    n_total = sum(COUNTS.values())
    assert steps == n_total // 8
    labels = np.concatenate([y["label"][:, 0] for _, y in take(ds, 50)])
    natural = (COUNTS[0, True] + COUNTS[1, True]) / n_total
    assert abs(_share(labels) - natural) < _binomial_tol(natural, 400)


def test_missing_class_falls_back_with_warning(P, tmp_path):
    write_shards(tmp_path, {(0, False): 10, (1, False): 10})
    cfg = cfg_with(augment=OFF)
    with pytest.warns(UserWarning, match="no positive"):
        ds, steps = P.train_dataset(tmp_path, 0, cfg, epochs=2, seed=0)
    assert steps == 1
    (x, y), = take(ds, 1)
    assert x.shape == (8, SIZE, SIZE, 1) and (y["label"] == 0).all()


# ----------------------------------------------------------------------------- training batches

def test_train_batches_shapes_values_labels(P, cache):
    folder, _ = cache
    cfg = cfg_with(augment=OFF)
    ds, steps = P.train_dataset(folder, 1, cfg, epochs=4, seed=3)
    assert steps == (COUNTS[0, True] + COUNTS[0, False]) // 8  # fold 1 held out
    for x, y in take(ds, 6):
        assert x.shape == (8, SIZE, SIZE, 1) and x.dtype == np.float32
        assert y["mask"].shape == (8, SIZE, SIZE, 1) and y["mask"].dtype == np.float32
        assert y["label"].shape == (8, 1) and y["label"].dtype == np.float32
        assert set(np.unique(y["mask"])) <= {0.0, 1.0}
        assert x.min() >= 0 and x.max() <= 255  # grey pixels: the model normalises inside
        # the grey 128 pixel present in every image, untouched
        np.testing.assert_array_equal(x[:, SIZE - 1, SIZE - 1, 0], np.full(8, 128.0))
        # training folds only: pixel (63, 0) = 100 + fold
        np.testing.assert_array_equal(x[:, SIZE - 1, 0, 0], 100)
        # label = has_mask, and the mask is exactly the bright rectangle
        has = y["mask"].reshape(8, -1).max(axis=1)
        np.testing.assert_array_equal(y["label"][:, 0], has)
        bright = x[..., 0] > 0.9 * 255
        np.testing.assert_array_equal(bright, y["mask"][..., 0] > 0.5)


def test_augmented_batches_keep_alignment(P, cache):
    folder, _ = cache
    cfg = cfg_with(augment={"hflip": 0.5, "color_p": 0.0, "affine_p": 1.0})
    ds, _ = P.train_dataset(folder, -1, cfg, epochs=2, seed=4)
    ious = []
    for x, y in take(ds, 8):
        bright = x[..., 0] > 150  # between 60 and 240
        mask = y["mask"][..., 0] > 0.5
        assert set(np.unique(y["mask"])) <= {0.0, 1.0}
        for i in range(len(x)):
            if y["label"][i, 0]:
                ious.append((bright[i] & mask[i]).sum() / (bright[i] | mask[i]).sum())
    assert len(ious) > 20 and min(ious) > 0.85 and np.mean(ious) > 0.9, (min(ious), np.mean(ious))


def test_random_crop_and_resize_shapes(P, cache):
    folder, _ = cache
    for crop in ("random_crop", "resize"):
        cfg = cfg_with(image_size=32, crop=crop)
        ds, _ = P.train_dataset(folder, 0, cfg, epochs=1, seed=5)
        (x, y), = take(ds, 1)
        assert x.shape == (8, 32, 32, 1) and y["mask"].shape == (8, 32, 32, 1)


def test_same_seed_same_first_batch(P, cache):
    folder, _ = cache
    cfg = cfg_with()  # default augmentations
    first = [take(P.train_dataset(folder, 0, cfg, epochs=3, seed=s)[0], 1)[0] for s in (7, 7, 8)]
    np.testing.assert_array_equal(first[0][0], first[1][0])
    np.testing.assert_array_equal(first[0][1]["mask"], first[1][1]["mask"])
    assert not np.array_equal(first[0][0], first[2][0])


def test_device_finish_is_the_same_batch_before_its_last_step(P, cache, tf):
    from tfpneumo.training.trainer import finish_on_device

    folder, _ = cache
    cfg = cfg_with()
    ds_float, _ = P.train_dataset(folder, 0, cfg, epochs=3, seed=7)
    ds_u8, _ = P.train_dataset(folder, 0, cfg, epochs=3, seed=7, device_finish=True)
    (x, y), (xu, yu) = next(iter(ds_float)), next(iter(ds_u8))
    assert xu["image"].dtype == tf.uint8 and xu["lut"].shape[1:] == (256,)
    assert yu["mask"].dtype == tf.uint8
    xf, yf = finish_on_device(xu, yu)
    np.testing.assert_array_equal(xf.numpy(), x.numpy())
    np.testing.assert_array_equal(yf["mask"].numpy(), y["mask"].numpy())
    np.testing.assert_array_equal(yf["label"].numpy(), y["label"].numpy())


def test_in_memory_cache_does_not_change_the_stream(P, cache):
    folder, _ = cache
    batches = []
    for mode in ("always", "never"):
        ds, _ = P.train_dataset(folder, 0, cfg_with(cache_in_memory=mode), epochs=2, seed=9)
        batches.append(take(ds, 3))
    for (xa, ya), (xb, yb) in zip(*batches, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya["mask"], yb["mask"])


def test_heavy_path_in_pipeline(P, cache):
    folder, _ = cache
    cfg = cfg_with(augment={"elastic_p": 1.0, "affine_p": 0.0})
    ds, _ = P.train_dataset(folder, 0, cfg, epochs=1, seed=6)
    (x, y), = take(ds, 1)
    assert x.shape == (8, SIZE, SIZE, 1) and y["mask"].shape == (8, SIZE, SIZE, 1)
    assert set(np.unique(y["mask"])) <= {0.0, 1.0}


def test_bad_requests_raise(P, cache, tmp_path):
    folder, _ = cache
    cfg = cfg_with()
    with pytest.raises(P.PipelineError, match="fold 5"):
        P.train_dataset(folder, 5, cfg, epochs=1)
    with pytest.raises(TfpneumoError, match="no prepared cache here"):
        P.train_dataset(tmp_path, 0, cfg, epochs=1)
    with pytest.raises(P.PipelineError, match="split"):
        P.eval_dataset(folder, 0, cfg, split="train")
    with pytest.raises(P.PipelineError, match="fold 3"):
        P.eval_dataset(folder, 3, cfg)


# ----------------------------------------------------------------------------- evaluation

def test_count_images(P, cache):
    folder, _ = cache
    assert P.count_images(folder, "train") == sum(COUNTS.values())
    assert P.count_images(folder, "train", {1}) == COUNTS[1, True] + COUNTS[1, False]
    assert P.count_images(folder, "train", {0}, positive=True) == COUNTS[0, True]
    assert P.count_images(folder, "test") == N_TEST


def test_count_images_bad_sidecar(P, tmp_path):
    write_shards(tmp_path, {(0, True): 2})
    side = records.sidecar_path(tmp_path / records.train_shard_name(0, True, 0))
    side.write_text('{"skipped": []}')
    with pytest.raises(P.PipelineError, match=side.name):
        P.count_images(tmp_path, "train")


def test_eval_sidecar_disagreeing_with_shard_fails(P, tmp_path, tf):
    write_shards(tmp_path, {(0, True): 3, (1, True): 3})
    side = records.sidecar_path(tmp_path / records.train_shard_name(0, True, 0))
    side.write_text(json.dumps({"ids": ["a", "b", "c", "d"]}))
    ds = P.eval_dataset(tmp_path, 0, cfg_with(), batch_size=2)
    with pytest.raises(tf.errors.FailedPreconditionError, match="expected to contain 4 elements"):
        take(ds, 10)


@pytest.mark.parametrize("fold", [0, 1])
def test_validation_split(P, cache, fold):
    folder, truth = cache
    cfg = cfg_with()
    ds = P.eval_dataset(folder, fold, cfg, split="val", batch_size=7)
    got = take(ds, 100)
    ids = [i.decode() for (d,) in got for i in d["image_id"]]
    expected = sorted(i for i, (f, _) in truth.items() if f == fold)
    assert sorted(ids) == expected and len(ids) == len(set(ids))  # fold k only, each once
    assert [len(d["image_id"]) for (d,) in got][-1] == len(ids) % 7 or len(ids) % 7 == 0
    assert int(ds.cardinality()) == len(got) == math.ceil(len(expected) / 7)
    for (d,) in got:
        assert d["image"].shape[1:] == (SIZE, SIZE, 1) and d["image"].dtype == np.uint8
        # id encoded in the pixels -> images aligned with ids
        np.testing.assert_array_equal(decode_index(d["image"]),
                                      [int(i[2:]) for i in d["image_id"].astype(str)])
        positive = np.array([truth[i][1] for i in d["image_id"].astype(str)], np.float32)
        np.testing.assert_array_equal(d["label"][:, 0], positive)
        np.testing.assert_array_equal(d["mask"].reshape(len(positive), -1).max(1), positive)
    again = [i.decode() for (d,) in take(ds, 100) for i in d["image_id"]]
    assert again == ids  # deterministic order


def test_even_batches_by_hand(P):
    # 40 images, 2 replicas of batch 6: plain batching gives 7 batches (one replica's 4th
    # would be empty); 8 batches of 5 instead
    assert P.even_batches(40, 6, 1, 2) == [[5] * 8]
    # 41 images on 2 workers of 1 replica, batch 2: shares 21 and 20, 11 batches each
    assert P.even_batches(41, 2, 2, 1) == [[2] * 10 + [1], [2] * 9 + [1] * 2]
    # 2 workers x 2 replicas, 18 images, batch 4: shares 9 and 9, ceil(9 / 4) = 3 -> 4 batches
    assert P.even_batches(18, 4, 2, 2) == [[3, 2, 2, 2], [3, 2, 2, 2]]
    assert P.even_batches(3, 8, 2, 2) == [[1, 1], [1, 0]]  # too few images: a 0


@pytest.mark.parametrize("workers,replicas", [(1, 2), (2, 1), (3, 2)])
def test_validation_shards_of_a_distributed_loop(P, cache, workers, replicas):
    """Worker k of n reads images k, k + n, ... of the plain order, in as many batches as every
    other worker, a multiple of its replicas, none empty: together the fold, each image once."""
    folder, truth = cache
    cfg = cfg_with()
    order = [i.decode() for (d,) in take(P.eval_dataset(folder, 1, cfg, batch_size=7), 100)
             for i in d["image_id"]]
    sizes = []
    for k in range(workers):
        ds = P.eval_dataset(folder, 1, cfg, batch_size=7, shard=(workers, k), replicas=replicas)
        got = [d for (d,) in take(ds, 100)]
        assert [i.decode() for d in got for i in d["image_id"]] == order[k::workers]
        for d in got:  # images still aligned with ids
            np.testing.assert_array_equal(decode_index(d["image"]),
                                          [int(i[2:]) for i in d["image_id"].astype(str)])
        sizes.append([len(d["image_id"]) for d in got])
    assert len({len(s) for s in sizes}) == 1 and len(sizes[0]) % replicas == 0
    assert min(min(s) for s in sizes) >= 1 and max(max(s) for s in sizes) <= 7
    with pytest.raises(TfpneumoError, match="fold 1: 40 images cannot give each of the 80 "
                                            "replicas an image"):
        P.eval_dataset(folder, 1, cfg, batch_size=7, shard=(40, 0), replicas=2)


def test_test_split(P, cache):
    folder, truth = cache
    ds = P.eval_dataset(folder, 0, cfg_with(), split="test", batch_size=4)
    got = [d for (d,) in take(ds, 10)]
    ids = [i.decode() for d in got for i in d["image_id"]]
    assert len(ids) == N_TEST and not set(ids) & set(truth)
    for d in got:
        assert (d["label"] == -1).all() and (d["mask"] == 0).all()
        np.testing.assert_array_equal(decode_index(d["image"]),
                                      [int(i[2:]) for i in d["image_id"].astype(str)])
