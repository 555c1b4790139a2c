"""``tfpneumo prepare``: decode every SIIM DICOM once into the sharded TFRecord cache.

Steps (see :mod:`tfpneumo.data.records` for the cache layout):

1. Read the label CSV, find the DICOMs, read every DICOM header (cheap, no pixels): metadata
   for index.csv and PatientID for grouped folds. Anything unusable is skipped and listed in
   manifest.json with its file, CSV row and reason; nothing is dropped silently.
2. Assign folds (StratifiedKFold on has_mask, or StratifiedGroupKFold on PatientID) over the
   sorted training ids, then cut each (fold, class) and the test ids into shards.
3. Write the shards in parallel, one task per shard, in ``spawn`` worker processes (each
   imports TensorFlow; forking after TensorFlow is imported is unsafe). Each shard is written
   to ``<name>.tmp`` and renamed, then its sidecar the same way, so a killed run leaves only
   whole shards; a rerun keeps every shard whose sidecar exists and builds the rest.
4. Write index.csv and manifest.json.

Every step is deterministic: the same inputs and settings give byte-identical shards.

Over ~500 lines on purpose: the plan, the resumable parallel run and the final write share
the one contract of a cache (what a finished shard is); the parts that stand alone already
live elsewhere (folds.py, records.py, manifest.py, dicom.py).
"""

from __future__ import annotations

import csv
import functools
import json
import multiprocessing
import os
import re
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tfpneumo.config import Config, dump_config, read_yaml, to_dict
from tfpneumo.data import records
from tfpneumo.data.dicom import MAX_DICOM_MIB, DicomError, find_dicoms, read_dicom, read_header
from tfpneumo.data.folds import assign_folds
from tfpneumo.data.labels import LabelTable, find_labels, read_label_table
from tfpneumo.data.manifest import write_manifest
from tfpneumo.data.preprocess import network_image, resize_mask
from tfpneumo.errors import TfpneumoError
from tfpneumo.files import atomic_path, write_json, write_text
from tfpneumo.progress import Progress

VERSION = 1
RLE_FORMAT = "relative"  # the competition's format, stage 1 and stage 2
INDEX_COLUMNS = ("image_id", "split", "fold", "has_mask", "n_rows", "patient_id", "patient_age",
                 "patient_sex", "view_position", "shard")
# prepare settings that do not change the cache's content (so a resume may change them)
_NOT_CONTENT = ("workers",)
_HEADER_CHUNK = 256
# temporary files this module writes; only these are removed as stale
_TMP_RE = re.compile(r"^(?:(?:train-f\d+-(?:pos|neg)|test)-\d{5}\.tfrecord(?:\.json)?"
                     r"|manifest\.json|index\.csv|prepare\.yaml)\.tmp$")


class PrepareError(TfpneumoError):
    """The data folder, the output folder or the settings cannot be used for prepare."""


class _Skip(Exception):
    """One image is left out of the cache; the message is the reason."""


@dataclass(frozen=True)
class Item:
    """One image to cache. ``has_mask``: 1 / 0 for training images, -1 for test images."""

    image_id: str
    path: str
    fold: int
    has_mask: int
    rles: tuple[str, ...] = ()
    lines: tuple[int, ...] = ()  # label CSV rows of the RLEs (for messages)
    row: int | None = None  # first label CSV row of the image (for messages)
    meta: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard (picklable)."""

    name: str
    items: tuple[Item, ...]
    size: int
    clahe: bool
    labels: str
    source: dict
    max_dicom_mib: float = MAX_DICOM_MIB


# ----------------------------------------------------------------------------- small helpers

def _skip(file: str | Path, row: int | None, reason: str) -> dict:
    return {"file": str(file), "row": row, "reason": reason}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _chunks(seq: Sequence, n: int) -> list[Sequence]:
    return [seq[i:i + n] for i in range(0, len(seq), n)]


# ----------------------------------------------------------------------------- per image

def _load(item: Item, size: int, clahe: bool, labels: str,
          max_mib: float = MAX_DICOM_MIB) -> tuple[np.ndarray, np.ndarray | None]:
    """Decoded, resized image ``(size, size) uint8`` and mask (None for test images).

    Raises :class:`_Skip` naming the problem; never returns a partial mask.
    """
    from tfpneumo.data import rle

    try:
        pixels, _ = read_dicom(item.path, max_mib)
    except DicomError as e:
        raise _Skip(str(e).removeprefix(f"{item.path}: ")) from e
    height, width = pixels.shape
    if height != width:
        raise _Skip(f"image is {height}x{width}; only square images are cached")
    mask = None
    if item.has_mask >= 0:
        full = np.zeros((height, width), np.uint8)
        for text, line in zip(item.rles, item.lines, strict=True):
            try:
                full |= rle.decode(text, (height, width), RLE_FORMAT)
            except rle.RLEError as e:
                raise _Skip(f"{labels} row {line}: {e}") from e
        if item.has_mask == 1 and not full.any():
            raise _Skip(f"{labels} rows {list(item.lines)}: positive image whose mask is empty")
        mask = resize_mask(full, size)
    return network_image(pixels, size, clahe), mask


def _index_row(item: Item, shard: str) -> dict:
    m = item.meta
    return {"image_id": item.image_id, "split": "train" if item.has_mask >= 0 else "test",
            "fold": item.fold, "has_mask": item.has_mask, "n_rows": len(item.rles),
            "patient_id": m.get("patient_id", ""), "patient_age": m.get("patient_age"),
            "patient_sex": m.get("patient_sex", ""), "view_position": m.get("view_position", ""),
            "shard": shard}


def write_shard(task: ShardTask, out: str) -> dict:
    """Writes one shard and then its sidecar, each atomically. Returns the sidecar content."""
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    start = time.perf_counter()
    path = Path(out) / task.name
    written, skipped, index = [], [], []
    tmp = path
    try:
        with atomic_path(path) as tmp, tf.io.TFRecordWriter(str(tmp)) as writer:
            for item in task.items:
                try:
                    image, mask = _load(item, task.size, task.clahe, task.labels,
                                        task.max_dicom_mib)
                except _Skip as e:
                    skipped.append(_skip(item.path, item.row, str(e)))
                    continue
                data = records.serialize_example(item.image_id, image, mask, item.has_mask,
                                                 item.fold, len(item.rles))
                # Protobuf map order varies between processes; deterministic=True sorts the
                # feature keys so reruns give byte-identical shards.
                writer.write(tf.train.Example.FromString(data).SerializeToString(
                    deterministic=True))
                written.append(item.image_id)
                index.append(_index_row(item, task.name))
        sidecar = {"version": VERSION, "shard": task.name, "source": task.source,
                   "planned": [item.image_id for item in task.items], "ids": written,
                   "positive": sum(1 for row in index if row["has_mask"] == 1),
                   "skipped": skipped, "index": index,
                   "seconds": round(time.perf_counter() - start, 3)}
        write_json(records.sidecar_path(path), sidecar)
    except OSError as e:
        raise PrepareError(f"{e.filename or path}: cannot write ({e.strerror or e})") from e
    except tf.errors.OpError as e:  # TFRecordWriter's own I/O errors (disk full, ...)
        raise PrepareError(f"{tmp}: cannot write ({e.message.splitlines()[0]})") from e
    return sidecar


def _cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _worker_init(parent_pid: int | None = None) -> None:
    import signal

    import cv2

    if parent_pid is not None:
        from tfpneumo.procs import die_with_parent

        # A parent killed by -9 (an out-of-memory kill) cannot shut the pool down; without
        # this its workers would go on writing shards that a rerun writes too.
        die_with_parent(parent_pid)

    # Ctrl-C reaches the whole process group: only the main process handles it (it cancels
    # the queued shards and lets the running ones finish, whole), so workers ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)  # one process per core already


def _read_headers(paths: Sequence[str], max_mib: float = MAX_DICOM_MIB) -> list[dict | str]:
    """Header metadata per path, or the error message for files that cannot be read (or
    larger than ``max_mib`` MiB decoded)."""
    out: list[dict | str] = []
    for path in paths:
        try:
            out.append(read_header(path, max_mib))
        except DicomError as e:
            out.append(str(e).removeprefix(f"{path}: "))
    return out


# ----------------------------------------------------------------------------- planning

def _check_output(out: Path, cfg: Config, source: dict) -> None:
    """Refuses an output folder that holds something other than a cache of the same settings."""
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder")
    if not out.exists():
        return
    try:
        entries = list(out.iterdir())
    except OSError as e:
        raise PrepareError(f"{out}: cannot read output folder ({e.strerror or e})") from e
    saved = out / "prepare.yaml"
    if not saved.exists():
        if entries:
            raise PrepareError(f"{out}: folder is not empty and is not a tfpneumo cache "
                               "(no prepare.yaml); use a new --out")
        return
    old = read_yaml(saved).get("prepare")
    new = to_dict(cfg)["prepare"]
    if not isinstance(old, dict):
        raise PrepareError(f"{saved}: no prepare section; use a new --out or delete it")
    for key, value in new.items():
        if key not in _NOT_CONTENT and old.get(key) != value:
            raise PrepareError(f"{out} was prepared with different settings ({key} "
                               f"{old.get(key)} != {value}); use a new --out or delete it")
    previous = [_read_json(p) for p in sorted(out.glob("*.tfrecord.json"))]
    previous.append(_read_json(out / "manifest.json"))
    for data in previous:
        if not isinstance(data, dict):
            continue
        old_source = data.get("source", data)  # sidecars: "source"; manifest: top level
        for key, value in source.items():
            if key in old_source and old_source[key] != value:
                what = {"data_dir": "data folder", "labels": "label file"}.get(key, key)
                raise PrepareError(f"{out} was prepared from a different {what} "
                                   f"({old_source[key]} != {value}); use a new --out or "
                                   "delete it")


def _remove_stale(out: Path, planned: set[str]) -> int:
    """Removes our own leftovers: ``*.tmp`` files of a killed run and shards (with sidecars)
    that the current plan does not contain. Returns the number of shards removed."""
    removed = 0
    for path in out.iterdir():
        if _TMP_RE.match(path.name):
            path.unlink(missing_ok=True)
        elif records.SHARD_RE.match(path.name) and path.name not in planned:
            path.unlink(missing_ok=True)
            records.sidecar_path(path).unlink(missing_ok=True)
            removed += 1
    return removed


def _headers(paths: list[str], pool: ProcessPoolExecutor | None,
             max_mib: float = MAX_DICOM_MIB) -> list[dict | str]:
    if pool is None or len(paths) <= _HEADER_CHUNK:
        return _read_headers(paths, max_mib)
    results: list[dict | str] = []
    for part in pool.map(functools.partial(_read_headers, max_mib=max_mib),
                         _chunks(paths, _HEADER_CHUNK)):
        results.extend(part)
    return results


def _mark_duplicates(paths: list[str], headers: dict[str, dict | str]) -> None:
    """The same image (SOPInstanceUID) under several file names would be cached twice, and
    could sit in two folds (train and validation at once): one file is kept (the one named by
    its UID, as SIIM names them, else the first of ``paths``), the others' headers become the
    reason they are skipped."""
    by_uid: dict[str, list[str]] = {}
    for path in paths:
        header = headers[path]
        if isinstance(header, dict) and header.get("sop_instance_uid"):
            by_uid.setdefault(header["sop_instance_uid"], []).append(path)
    for uid, group in by_uid.items():
        if len(group) < 2:
            continue
        keep = next((p for p in group if Path(p).stem == uid), group[0])
        for path in group:
            if path != keep:
                headers[path] = (f"duplicate image: SOPInstanceUID {uid} is also {keep}, "
                                 "which is cached instead")


def _plan(table: LabelTable, labels_path: Path, train_files: dict[str, Path],
          test_files: dict[str, Path], cfg: Config, pool: ProcessPoolExecutor | None,
          skipped: list[dict]) -> tuple[list[Item], list[Item]]:
    """Matches labels and DICOMs, reads headers, assigns folds. Appends skips to ``skipped``."""
    pc = cfg.prepare
    bad_label_ids = {image_id for image_id, _, _ in table.problems}
    for image_id, rows in table.rows.items():
        if image_id not in train_files:
            skipped.append(_skip(labels_path, rows[0].line,
                                 f"no DICOM for label row {rows[0].line} (ImageId {image_id})"))
    for image_id, path in train_files.items():
        if image_id not in table.rows and image_id not in bad_label_ids:
            skipped.append(_skip(path, None, f"no label row in {labels_path.name}"))

    train_ids = sorted(i for i in train_files if i in table.rows)
    test_ids = sorted(test_files)
    paths = [str(train_files[i]) for i in train_ids] + [str(test_files[i]) for i in test_ids]
    headers = dict(zip(paths, _headers(paths, pool, cfg.data.max_dicom_mib), strict=True))
    _mark_duplicates(paths, headers)

    def usable(image_id: str, path: Path, row: int | None) -> dict | None:
        header = headers[str(path)]
        if isinstance(header, str):
            skipped.append(_skip(path, row, header))
            return None
        if header["height"] and header["height"] != header["width"]:
            skipped.append(_skip(path, row, f"image is {header['height']}x{header['width']}; "
                                 "only square images are cached"))
            return None
        return header

    train: list[tuple[str, dict]] = []
    for image_id in train_ids:
        header = usable(image_id, train_files[image_id], table.rows[image_id][0].line)
        if header is not None:
            train.append((image_id, header))
    test = [(i, h) for i in test_ids if (h := usable(i, test_files[i], None)) is not None]
    if not train:
        first = f"; first: {skipped[0]['reason']}" if skipped else ""
        raise PrepareError(f"no usable training image: {len(train_files)} DICOM(s) in "
                           f"dicom-images-train, {len(table.rows)} labelled id(s) in "
                           f"{labels_path}, {len(skipped)} skipped{first}")

    has_mask = [int(bool(table.rles(i))) for i, _ in train]
    groups = [h["patient_id"] or i for i, h in train]
    fold_of = assign_folds([i for i, _ in train], has_mask, groups, pc.folds,
                           pc.group_by_patient, pc.seed) if train else {}
    train_items = []
    for (image_id, header), positive in zip(train, has_mask, strict=True):
        rows = [r for r in table.rows[image_id] if r.rle]
        train_items.append(Item(image_id, str(train_files[image_id]), fold_of[image_id],
                                positive, tuple(r.rle for r in rows), tuple(r.line for r in rows),
                                table.rows[image_id][0].line, header))
    test_items = [Item(i, str(test_files[i]), -1, -1, meta=h) for i, h in test]
    return train_items, test_items


def _shards(train: list[Item], test: list[Item], cfg: Config, labels: Path,
            source: dict) -> list[ShardTask]:
    """Deterministic shards: per (fold, class) the sorted ids in chunks, then the test ids."""
    pc = cfg.prepare
    tasks = []

    def task(name: str, items: Sequence[Item]) -> ShardTask:
        return ShardTask(name, tuple(items), pc.size, pc.clahe, str(labels), source,
                         cfg.data.max_dicom_mib)

    for fold in range(pc.folds):
        for positive in (True, False):
            items = sorted((it for it in train if it.fold == fold and it.has_mask == positive),
                           key=lambda it: it.image_id)
            for k, chunk in enumerate(_chunks(items, pc.shard_size)):
                tasks.append(task(records.train_shard_name(fold, positive, k), chunk))
    for k, chunk in enumerate(_chunks(sorted(test, key=lambda it: it.image_id), pc.shard_size)):
        tasks.append(task(records.test_shard_name(k), chunk))
    return tasks


def _is_done(task: ShardTask, out: Path) -> dict | None:
    """The sidecar of a complete shard written from the same plan, else None."""
    shard = out / task.name
    sidecar = _read_json(records.sidecar_path(shard))
    if (isinstance(sidecar, dict) and shard.exists() and sidecar.get("version") == VERSION
            and sidecar.get("planned") == [it.image_id for it in task.items]
            and sidecar.get("source") == task.source):
        return sidecar
    return None


# ----------------------------------------------------------------------------- running

def _run(tasks: list[ShardTask], out: Path, workers: int, pool_factory,
         progress: Progress) -> list[dict]:
    """Writes ``tasks``; in this process when one worker suffices, else in the pool."""
    results: list[dict] = []
    if workers <= 1 or len(tasks) <= 1:
        if tasks:
            from tfpneumo.tfimport import quiet_tensorflow

            quiet_tensorflow()
            progress.restart()  # the rate should not include TensorFlow's start-up
        for task in tasks:
            results.append(write_shard(task, str(out)))
            progress.update(len(task.items))
        return results
    pool = pool_factory(min(workers, len(tasks)))
    # Big shards first so that the last ones to finish are small.
    futures: dict[Future, ShardTask] = {
        pool.submit(write_shard, t, str(out)): t
        for t in sorted(tasks, key=lambda t: -len(t.items))}
    from concurrent.futures import as_completed

    try:
        for future in as_completed(futures):
            results.append(future.result())
            progress.update(len(futures[future].items))
    except BrokenProcessPool as e:
        raise PrepareError("a worker process died (out of memory?); rerun the same command "
                           "to resume, perhaps with fewer --workers") from e
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return results


def _index_csv(rows: Iterable[dict]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in INDEX_COLUMNS})
    return buf.getvalue()


def prepare_cache(data_dir: str | Path, out: str | Path, cfg: Config,
                  labels: str | Path | None = None, progress: bool = True) -> str:
    """Builds (or resumes) the TFRecord cache of a SIIM folder. Returns a one-line summary.

    ``data_dir`` holds ``dicom-images-train/`` (required), ``dicom-images-test/`` (optional)
    and the label CSV (``labels``, else found by :func:`tfpneumo.data.labels.find_labels`).
    Settings come from ``cfg.prepare``. Raises :class:`tfpneumo.TfpneumoError` subclasses
    with one-line messages for unusable input; single bad images are skipped and listed in
    ``manifest.json`` instead.
    """
    start = time.perf_counter()
    pc = cfg.prepare
    data_dir, out = Path(data_dir), Path(out)
    if not data_dir.is_dir():
        raise PrepareError(f"{data_dir}: data folder not found")
    try:
        os.listdir(data_dir)
    except OSError as e:
        raise PrepareError(f"{data_dir}: cannot read data folder ({e.strerror or e})") from e
    train_dir, test_dir = data_dir / "dicom-images-train", data_dir / "dicom-images-test"
    if not train_dir.is_dir():
        raise PrepareError(f"{data_dir}: no dicom-images-train/ folder (expected the SIIM "
                           "layout: dicom-images-train/, dicom-images-test/, train-rle.csv)")
    labels_path = Path(labels) if labels is not None else find_labels(data_dir)
    source = {"data_dir": str(data_dir.resolve()), "labels": str(labels_path.resolve())}

    _check_output(out, cfg, source)
    table = read_label_table(labels_path)
    bad_names: list[tuple[Path, str]] = []
    train_files = find_dicoms(train_dir, bad_names)
    test_files = find_dicoms(test_dir, bad_names) if test_dir.is_dir() else {}

    skipped = [_skip(path, None, reason) for path, reason in bad_names]
    skipped += [_skip(labels_path, line, reason) for _, line, reason in table.problems]
    workers = pc.workers or _cpu_count()
    pool: ProcessPoolExecutor | None = None

    def pool_factory(n: int) -> ProcessPoolExecutor:
        nonlocal pool
        if pool is None:
            # spawn, never fork: the workers import TensorFlow, which is not fork-safe.
            pool = ProcessPoolExecutor(max_workers=n, initializer=_worker_init,
                                       initargs=(os.getpid(),),
                                       mp_context=multiprocessing.get_context("spawn"))
        return pool

    try:
        n_files = len(train_files) + len(test_files)
        use_pool = workers > 1 and n_files > 2 * _HEADER_CHUNK
        header_pool = pool_factory(workers) if use_pool else None
        train, test = _plan(table, labels_path, train_files, test_files, cfg, header_pool,
                            skipped)
        tasks = _shards(train, test, cfg, labels_path, source)
        # Only now that the plan stands: a run that fails on its input leaves no folder behind
        # that would then refuse the corrected settings.
        try:
            out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, out / "prepare.yaml")
        except OSError as e:
            raise PrepareError(f"{out}: cannot write ({e.strerror or e})") from e
        _remove_stale(out, {t.name for t in tasks})
        done = {t.name: s for t in tasks if (s := _is_done(t, out)) is not None}
        pending = [t for t in tasks if t.name not in done]
        bar = Progress(f"prepare {out}", sum(len(t.items) for t in pending),
                        progress and bool(pending))
        for sidecar in _run(pending, out, workers, pool_factory, bar):
            done[sidecar["shard"]] = sidecar
        bar.close()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    manifest = _write_results(out, cfg, source, [done[t.name] for t in tasks], skipped,
                              time.perf_counter() - start)
    c = manifest["counts"]
    listed = " (listed in manifest.json)" if c["skipped"] else ""
    return (f"prepared {out}: {c['train']} train images ({c['positive']} positive, "
            f"{c['negative']} negative) in {pc.folds} folds, {c['test']} test images, "
            f"{c['skipped']} skipped{listed}; {len(tasks)} shards ({len(pending)} written, "
            f"{len(tasks) - len(pending)} reused) in {manifest['seconds']:.1f} s")


def _write_results(out: Path, cfg: Config, source: dict, sidecars: list[dict],
                   skipped: list[dict], seconds: float) -> dict:
    """Writes index.csv and manifest.json from the shards' sidecars; returns the manifest."""
    pc = cfg.prepare
    index = [row for s in sidecars for row in s["index"]]
    skipped = skipped + [entry for s in sidecars for entry in s["skipped"]]
    train = [row for row in index if row["split"] == "train"]
    n_pos = sum(1 for row in train if row["has_mask"] == 1)
    per_fold = {str(f): {"positive": 0, "negative": 0} for f in range(pc.folds)}
    for row in train:
        per_fold[str(row["fold"])]["positive" if row["has_mask"] == 1 else "negative"] += 1
    try:
        write_text(out / "index.csv", _index_csv(index))
        return write_manifest(
            out, size=pc.size, folds=pc.folds, clahe=pc.clahe, version=VERSION,
            data_dir=source["data_dir"], labels=source["labels"],
            group_by_patient=pc.group_by_patient, seed=pc.seed, rle_format=RLE_FORMAT,
            counts={"train": len(train), "test": len(index) - len(train), "positive": n_pos,
                    "negative": len(train) - n_pos, "skipped": len(skipped)},
            fold_counts=per_fold, shards=[_shard_entry(s) for s in sidecars], skipped=skipped,
            seconds=round(seconds, 2))
    except OSError as e:
        raise PrepareError(f"{e.filename or out}: cannot write ({e.strerror or e})") from e


def _shard_entry(sidecar: dict) -> dict:
    m = records.SHARD_RE.match(sidecar["shard"])
    assert m is not None
    is_test = m.group("fold") is None
    return {"name": sidecar["shard"], "split": "test" if is_test else "train",
            "fold": -1 if is_test else int(m.group("fold")),
            "positive": None if is_test else m.group("cls") == "pos",
            "count": len(sidecar["ids"]), "skipped": len(sidecar["skipped"])}
