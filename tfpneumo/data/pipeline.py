"""tf.data builders over the TFRecord cache: training (augmented, positive-rate schedule) and
evaluation (full resolution, deterministic, ids kept).

Training stream, per class (positives and negatives read from separate shard lists)::

    TFRecordDataset(shuffled files, parallel reads) -> parse -> [cache()] -> shuffle -> repeat

then ``sample_from_datasets`` with a weights *dataset* that follows the positive-rate schedule
(element i belongs to epoch ``initial_epoch + i // (steps_per_epoch * batch)``), then
augmentation (:mod:`tfpneumo.data.augment`, one resampling pass, stateless seeds) and
``batch(drop_remainder=True)``. With no schedule (rates null) all shards form one stream in
their natural class ratio.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

from tfpneumo.config import Config
from tfpneumo.data import records
from tfpneumo.data.augment import augment_batch_uint8, finish_batch
from tfpneumo.data.manifest import read_cache_info
from tfpneumo.errors import TfpneumoError

__all__ = ["PipelineError", "count_images", "eval_dataset", "positive_rate", "train_dataset"]

AUTOTUNE = -1


class PipelineError(TfpneumoError):
    """The cache cannot feed the requested split or fold."""


def _tf():
    from tfpneumo.tfimport import quiet_tensorflow

    return quiet_tensorflow()


# ----------------------------------------------------------------------------- small helpers

def positive_rate(epoch: int, epochs: int, start: float, end: float) -> float:
    """Share of positives in epoch ``epoch`` (0-based): linear from ``start`` at epoch 0 to
    ``end`` at epoch ``epochs - 1``; clamped outside; ``start`` when ``epochs <= 1``."""
    if epochs <= 1:
        return float(start)
    t = min(max(epoch, 0), epochs - 1) / (epochs - 1)
    return float(start + (end - start) * t)


def _sidecar_ids(shard: str | Path) -> list[str]:
    side = records.sidecar_path(Path(shard))
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PipelineError(f"{side}: cannot read shard sidecar ({e.__class__.__name__})") from e
    if not isinstance(data, dict) or not isinstance(data.get("ids"), list):
        raise PipelineError(f"{side}: shard sidecar has no 'ids' list")
    return data["ids"]


def count_images(cache: str | Path, split: str = "train", folds: set[int] | None = None,
                 positive: bool | None = None) -> int:
    """Number of images in the complete shards of ``split`` (from the sidecars' ``ids``).

    ``folds`` and ``positive`` filter training shards as in :func:`records.list_shards`.
    """
    _check_split(split, ("train", "test"))
    shards = records.list_shards(cache, split, folds=folds, positive=positive)
    return sum(len(_sidecar_ids(s)) for s in shards)


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise PipelineError(f"split {split!r}: expected one of {list(allowed)}")


def _parse_train(size: int):
    """Record -> (image (C, C, 1) uint8, mask (C, C, 1) uint8, label (1,) float32)."""
    tf = _tf()

    def parse(serialized):
        ex = records.parse_example(serialized)
        image = tf.ensure_shape(ex["image"], [size, size, 1])
        mask = tf.ensure_shape(ex["mask"], [size, size, 1])
        label = tf.reshape(tf.cast(ex["has_mask"], tf.float32), [1])
        return image, mask, label

    return parse


def _class_stream(files: list[str], size: int, cfg: Config, use_cache: bool,
                  seed: np.random.SeedSequence, service: bool = False):
    """One class (or all shards): shuffled files -> parse -> [cache] -> shuffle -> repeat.

    For a tf.data service (``service``) the file names repeat *before* the records are read:
    the dispatcher then hands out file names without end, one at a time to whichever worker
    asks. With the repeat after the reader, a worker that got no file in a pass spins until
    every worker finished it (measured: 1.3x instead of 1.8x from 1 to 2 workers).
    """
    tf = _tf()
    file_seed, shuffle_seed = (int(s) for s in seed.generate_state(2))
    order = np.random.default_rng(file_seed).permutation(len(files))
    ordered = [files[i] for i in order]
    if service:
        names = tf.data.Dataset.from_tensor_slices(ordered).repeat()
        ds = names.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)),
                              num_parallel_calls=AUTOTUNE)
        ds = ds.map(_parse_train(size), num_parallel_calls=AUTOTUNE)
        return ds.shuffle(cfg.data.shuffle_buffer, seed=shuffle_seed)
    ds = tf.data.TFRecordDataset(ordered, num_parallel_reads=AUTOTUNE)
    ds = ds.map(_parse_train(size), num_parallel_calls=AUTOTUNE)
    if use_cache:
        ds = ds.cache()
    ds = ds.shuffle(cfg.data.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.repeat()


def _aug_seed(r, images):
    """``(2,)`` augmentation seed: the stream's random number and a hash of the pixels.

    The pixels' part matters under a tf.data service: every worker runs its own copy of
    ``Dataset.random``, so the i-th batches of two workers would otherwise get the same draws.
    """
    tf = _tf()
    sample = tf.io.serialize_tensor(images[..., ::16, ::16, :])
    return tf.stack([r, tf.strings.to_hash_bucket_fast(sample, 2**62)])


def _read_from_service(ds, service: str, stream: str):
    """``ds`` registered with the dispatcher ``service`` and read back from its workers.

    Registered, then read by id (not ``distribute``): the reading pipeline is a new one, so
    the workers' one-thread option does not carry over to it. ``stream`` names the job:
    readers of the same stream (e.g. the processes of a multi-worker run) share one job and
    split it; any other stream gets its own.
    """
    tf = _tf()
    service_api = tf.data.experimental.service
    # Compression (snappy) costs CPU on both ends; worth it over a network, not on this host.
    local = service.removeprefix("grpc://").rsplit(":", 1)[0] in ("127.0.0.1", "localhost")
    dataset_id = service_api.register_dataset(service, ds,
                                              compression=None if local else "AUTO")
    job = "tfpneumo-train-" + hashlib.sha1(stream.encode()).hexdigest()[:16]
    return service_api.from_dataset_id("distributed_epoch", service, dataset_id,
                                       element_spec=ds.element_spec, job_name=job)


def _replica_rows(input_context, batch: int) -> tuple[int, int, int]:
    """``(local replicas, rows per replica, first row)`` of this input pipeline in each
    global batch of ``batch`` rows; ``(1, batch, 0)`` without an input context."""
    if input_context is None:
        return 1, batch, 0
    replicas, pipelines = input_context.num_replicas_in_sync, input_context.num_input_pipelines
    if batch % replicas or replicas % pipelines:
        raise PipelineError(f"global batch {batch} does not split over {replicas} replicas "
                            f"in {pipelines} input pipelines")
    local, rows = replicas // pipelines, batch // replicas
    return local, rows, input_context.input_pipeline_id * local * rows


def _split_rows(ds, local: int, rows: int, first: int):
    """``((images, masks, ...), r)`` global batches -> ``local`` elements per batch: rows
    ``first + j*rows ...`` for local replica ``j``, each with the batch's random number ``r``
    (the replica's draws then differ through the pixel hash of :func:`_aug_seed` only)."""
    tf = _tf()

    def parts(elem, r):
        mine = tuple(tf.reshape(t[first:first + local * rows], [local, rows, *t.shape[1:]])
                     for t in elem)
        return mine, tf.fill([local], r)

    return ds.map(parts).unbatch()


# ----------------------------------------------------------------------------- training

def train_dataset(cache: str | Path, fold: int, cfg: Config, *,
                  global_batch_size: int | None = None, epochs: int,
                  steps_per_epoch: int | None = None, seed: int | None = None,
                  initial_epoch: int = 0, vectorize: bool = True,
                  service: str | None = None, device_finish: bool = False,
                  input_context=None):
    """Infinite augmented training batches and the number of steps per epoch.

    Args:
        cache: folder written by ``tfpneumo prepare``.
        fold: validation fold, excluded from training; -1 trains on all folds.
        cfg: uses ``cfg.data`` and ``cfg.augment``.
        global_batch_size: batch over all replicas (default ``cfg.data.batch_size``).
        epochs: total epochs of the run (sets the positive-rate schedule).
        steps_per_epoch: default = training images // global batch (at least 1).
        seed: reproducible stream (default ``cfg.seed``); mixed with ``initial_epoch`` so a
            resumed run does not replay epoch 0's draws.
        initial_epoch: epoch the stream starts at (resume); the schedule starts there.
        vectorize: augment whole batches (True, faster) or single images (False).
        service: a tf.data service dispatcher (``"grpc://host:port"``, e.g. from
            :func:`tfpneumo.data.service.start_local_service`): the augmented batches are then
            made by its workers (``distributed_epoch``: each record file goes to one worker)
            and this process only reads them. None (default): everything runs here. With
            heavy augmentations the workers must have registered ``cfg.augment``
            (``start_local_service(augments=...)``, ``tfpneumo data-worker --config``).
            Consumers of one dispatcher that build the same stream (same cache, fold, config,
            seed and start epoch; e.g. the workers of a multi-worker run) share one job and
            split it; any other stream gets a job of its own.

        device_finish: leave the last step (uint8 -> float32 through the per-image grey-level
            table) to the train step (:func:`tfpneumo.training.trainer.finish_on_device`), on the
            training device: elements are then ``({"image": (B, S, S, 1) uint8, "lut":
            (B, 256) float32}, {"mask": (B, S, S, 1) uint8, "label": (B, 1) float32})``.
        input_context: a ``tf.distribute.InputContext`` (from
            ``strategy.distribute_datasets_from_function``): the dataset then yields this
            input pipeline's per-replica batches, one per local replica in turn. Every
            pipeline draws the same global batches and keeps its own rows of each (replica
            ``r`` of ``R`` gets rows ``r*B/R ... (r+1)*B/R - 1``) before augmenting them, so one
            device, several GPUs and several machines train on the same images in the same
            order, and a replica's augmentation draws do not depend on how replicas are
            spread over machines (see :func:`_replica_rows`). Under a tf.data service each
            pipeline reads its own batches of ``B/P`` from the shared job instead.

    Returns:
        ``(dataset, steps_per_epoch)``; elements ``(images, {"mask": masks, "label": labels})``
        with images ``(B, S, S, 1)`` float32 grey levels in [0, 255] (the model normalises
        inside), masks ``(B, S, S, 1)``
        float32 0/1, labels ``(B, 1)`` float32 (has_mask), S = ``cfg.data.image_size``.
    """
    tf = _tf()
    cache = Path(cache)
    data = cfg.data
    batch = int(global_batch_size or data.batch_size)
    if batch < 1:
        raise PipelineError(f"global_batch_size {batch}: must be >= 1")
    if epochs < 1:
        raise PipelineError(f"epochs {epochs}: must be >= 1")
    info = read_cache_info(cache)
    folds = list(range(info.folds))
    if fold != -1 and fold not in folds:
        raise PipelineError(f"{cache}: fold {fold} not in the cache's folds {folds} (or -1)")
    train_folds = {f for f in folds if f != fold}
    if not train_folds:
        raise PipelineError(f"{cache}: fold {fold} is the only fold; nothing left to train on")

    pos = records.list_shards(cache, "train", folds=train_folds, positive=True)
    neg = records.list_shards(cache, "train", folds=train_folds, positive=False)
    n_pos = sum(len(_sidecar_ids(s)) for s in pos)
    n_neg = sum(len(_sidecar_ids(s)) for s in neg)
    n_images = n_pos + n_neg
    if n_images == 0:
        raise PipelineError(f"{cache}: training shards of folds {sorted(train_folds)} are empty")
    if steps_per_epoch is None:
        steps_per_epoch = max(1, n_images // batch)
    size = info.size

    budget = data.memory_budget_gb * 1e9
    # Not under a tf.data service: its workers each read only the record files handed to them,
    # and a cached stream there replays (or spins on) a partial set.
    use_cache = not service and (data.cache_in_memory == "always" or (
        data.cache_in_memory == "auto" and n_images * size * size * 2 < budget))

    base = np.random.SeedSequence([(cfg.seed if seed is None else int(seed)) % 2**63,
                                   max(int(initial_epoch), 0)])
    s_pos, s_neg, s_all, s_mix, s_aug = base.spawn(5)

    start, end = data.positive_rate_start, data.positive_rate_end
    if start is None or end is None:
        ds = _class_stream(pos + neg, size, cfg, use_cache, s_all, bool(service))
    elif n_pos == 0 or n_neg == 0:
        missing = "positive" if n_pos == 0 else "negative"
        warnings.warn(f"{cache}: no {missing} training images in folds {sorted(train_folds)}; "
                      "positive-rate schedule ignored", stacklevel=2)
        ds = _class_stream(pos + neg, size, cfg, use_cache, s_all, bool(service))
    else:
        rates = tf.constant([positive_rate(e, epochs, start, end) for e in range(epochs)],
                            tf.float32)
        per_epoch = tf.constant(steps_per_epoch * batch, tf.int64)

        def weights_of(i):
            epoch = tf.minimum(initial_epoch + i // per_epoch, epochs - 1)
            rate = tf.gather(rates, epoch)
            return tf.stack([rate, 1.0 - rate])

        weights = tf.data.Dataset.counter(dtype=tf.int64).map(weights_of)
        ds = tf.data.Dataset.sample_from_datasets(
            [_class_stream(pos, size, cfg, use_cache, s_pos, bool(service)),
             _class_stream(neg, size, cfg, use_cache, s_neg, bool(service))],
            weights=weights, seed=int(s_mix.generate_state(1)[0]))

    npc = AUTOTUNE if data.num_parallel_calls == -1 else data.num_parallel_calls
    out_size, crop, aug = data.image_size, data.crop, cfg.augment
    aug_seed = int(s_aug.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    local, rows, first = _replica_rows(input_context, batch)
    if service:  # each reader gets whole batches of its own from the shared job
        batch, first = local * rows, 0

    # Workers of a tf.data service send the uint8 resampled batch and its grey-level tables;
    # the lookup to float32 (4x the bytes) happens on the reading side.
    if vectorize:
        ds = ds.batch(batch, drop_remainder=True)
        ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=aug_seed))
        if not service and input_context is not None:
            ds = _split_rows(ds, local, rows, first)

        def aug_batch(elem, r):
            images, masks, labels = elem
            return (*augment_batch_uint8(images, masks, _aug_seed(r, images), aug, out_size,
                                         crop), labels)

        ds = ds.map(aug_batch, num_parallel_calls=npc)
    else:
        ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=aug_seed))

        def aug_one(elem, r):
            image, mask, label = elem
            img, msk, lut = augment_batch_uint8(image[None], mask[None], _aug_seed(r, image),
                                                aug, out_size, crop)
            return img[0], msk[0], lut[0], label

        ds = ds.map(aug_one, num_parallel_calls=npc)
        ds = ds.batch(batch, drop_remainder=True)
        if not service and input_context is not None:
            ds = _split_rows(ds.map(lambda *elem: (elem, 0)), local, rows, first).map(
                lambda elem, _: elem)

    options = tf.data.Options()
    options.deterministic = True
    if service:
        # One thread per service worker: its Python transforms hold one GIL anyway, and N
        # workers then use N cores, here or on other machines.
        options.threading.private_threadpool_size = 1
    ds = ds.with_options(options)
    if service:
        ds = _read_from_service(ds, service, repr((
            str(cache.resolve()), fold, cfg.data, cfg.augment, cfg.seed, seed, initial_epoch,
            epochs, steps_per_epoch, batch, vectorize)))

    if service and local > 1:  # this reader's batch, one part per local replica
        ds = _split_rows(ds.map(lambda *elem: (elem, 0)), local, rows, 0).map(
            lambda elem, _: elem)

    def finish(images, masks, luts, labels):
        if device_finish:
            return {"image": images, "lut": luts}, {"mask": masks, "label": labels}
        img, msk = finish_batch(images, masks, luts)
        return img, {"mask": msk, "label": labels}

    ds = ds.map(finish, num_parallel_calls=npc).prefetch(AUTOTUNE)
    return ds, int(steps_per_epoch)


# ----------------------------------------------------------------------------- evaluation

def even_batches(n_images: int, batch_size: int, workers: int, replicas: int) -> list[list[int]]:
    """Per worker, the batch sizes of its share of ``n_images`` (worker k holds images k,
    k + workers, ...): the same number of batches on every worker, a multiple of its
    ``replicas``, near-equal sizes (largest first) of at most ``batch_size``. A size 0 means
    there are too few images for that many replicas."""
    shares = [len(range(k, n_images, workers)) for k in range(workers)]
    per_replica = -(-max(shares) // batch_size) if shares else 0  # ceil
    n_batches = replicas * -(-per_replica // replicas)
    out = []
    for share in shares:
        q, r = divmod(share, n_batches) if n_batches else (0, 0)
        out.append([q + 1] * r + [q] * (n_batches - r))
    return out


def eval_dataset(cache: str | Path, fold: int, cfg: Config, *,
                 split: Literal["val", "test"] = "val", batch_size: int | None = None,
                 shard: tuple[int, int] = (1, 0), replicas: int = 1):
    """Deterministic full-resolution batches, no augmentation, every image exactly once.

    ``split="val"`` reads fold ``fold``'s shards (positives and negatives), ``"test"`` the
    test shards; files in sorted order, read sequentially. Elements are dicts:
    ``image`` (B, C, C, 1) uint8 as cached (the model takes pixels), ``mask`` (B, C, C, 1) float32 0/1 (zeros for
    test), ``label`` (B, 1) float32 has_mask (-1 for test), ``image_id`` (B,) string.
    The last batch may be smaller. Use ``ds.map(lambda d: d["image"])`` for ``predict``
    and iterate ``ds.map(lambda d: d["image_id"])`` in the same order to align ids.

    Inside a distributed training loop (worker ``k`` of ``n`` with ``replicas`` replicas,
    ``shard=(n, k)``): only images ``k, k + n, k + 2n, ...`` of that order, in near-equal
    batches of at most ``batch_size``, as many on every worker and a multiple of
    ``replicas`` (:func:`even_batches`), so that no replica gets an empty batch (TensorFlow's
    CPU convolution returns its input for one, and a loss that sums over replicas needs each
    of them in every step).
    """
    tf = _tf()
    count, index = shard
    if not 0 <= index < count:
        raise PipelineError(f"shard {shard}: expected (n, k) with 0 <= k < n")
    cache = Path(cache)
    _check_split(split, ("val", "test"))
    if split == "val":
        if fold < 0:
            raise PipelineError(f"fold {fold}: validation needs a fold >= 0")
        files = records.list_shards(cache, "train", folds={fold})
        what = f"fold {fold}"
    else:
        files = records.list_shards(cache, "test")
        what = "the test split"
    if not files:
        raise PipelineError(f"{cache}: no complete shards for {what}")
    size = read_cache_info(cache).size
    batch = int(batch_size or cfg.data.batch_size)

    def parse(serialized):
        ex = records.parse_example(serialized)
        return {"image": tf.ensure_shape(ex["image"], [size, size, 1]),
                "mask": tf.ensure_shape(ex["mask"], [size, size, 1]),
                "label": tf.reshape(tf.cast(ex["has_mask"], tf.float32), [1]),
                "image_id": ex["image_id"]}

    def masks_to_float(d):
        return {"image": d["image"], "mask": tf.cast(d["mask"], tf.float32),
                "label": d["label"], "image_id": d["image_id"]}

    ds = tf.data.TFRecordDataset(files, num_parallel_reads=None)
    # Known cardinality (from the sidecars): predict() sizes its progress bar and does not
    # warn "ran out of data"; a sidecar that disagrees with its shard fails loudly.
    n_images = sum(len(_sidecar_ids(f)) for f in files)
    ds = ds.apply(tf.data.experimental.assert_cardinality(n_images))
    if count == 1 and replicas == 1:
        ds = ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=True).batch(batch)
    else:
        every = even_batches(n_images, batch, count, replicas)
        if min(min(sizes, default=0) for sizes in every) == 0:  # the same answer on every worker
            raise PipelineError(f"{what}: {n_images} images cannot give each of the "
                                f"{count * replicas} replicas an image in every batch")
        sizes = every[index]
        big, n_big = sizes[0], sizes.count(sizes[0])  # sizes: n_big of big, then big - 1
        # the other workers' records are skipped before parsing, not decoded
        mine = ds.shard(count, index)
        ds = mine.take(big * n_big).map(parse, num_parallel_calls=AUTOTUNE,
                                        deterministic=True).batch(big)
        if n_big < len(sizes):
            ds = ds.concatenate(mine.skip(big * n_big).map(
                parse, num_parallel_calls=AUTOTUNE, deterministic=True).batch(big - 1))
    ds = ds.map(masks_to_float, num_parallel_calls=AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(AUTOTUNE)
