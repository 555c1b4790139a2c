"""Scale-out on TensorFlow's own engines: the tf.data service (local dispatcher, worker
processes). Training on several machines (MultiWorkerMirroredStrategy, two worker processes on
127.0.0.1) is tests/system/test_multi_worker.py.

Each test runs its TensorFlow work in child processes started from this file
(``python tests/test_scaleout.py <mode> ...``): a strategy or a service needs a fresh runtime,
and a hung gRPC peer must not hang pytest, so every child is bounded by a timeout and killed on
failure. Oracles: the ids of a finite dataset (each exactly once per epoch) and the fold layout
of a hand-made cache (validation ids never appear).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

THIS = Path(__file__).resolve()
TESTS_DIR = THIS.parents[1]  # tests/: factories.py
N_IDS = 60  # elements of the finite service dataset
TIMEOUT = 150  # seconds for one child process (they normally take 10-25 s)


# ----------------------------------------------------------------------------- helpers

def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (the OS picks them; sockets closed after)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", SM_FRAMEWORK="tf.keras", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def run_children(commands: list[list[str]], envs: list[dict[str, str]]) -> list[str]:
    """Starts every command at once, waits for all (bounded), kills them all on any failure.

    Returns each child's stdout; fails the test with the children's stderr tails otherwise.
    """
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for cmd, env in zip(commands, envs, strict=True)]
    outs: list[tuple[str, str]] = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=TIMEOUT))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.communicate()
        pytest.fail(f"scale-out child processes did not finish within {TIMEOUT} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(i, err) for i, (proc, (_, err)) in enumerate(zip(procs, outs, strict=True))
              if proc.returncode != 0]
    if failed:
        pytest.fail("\n".join(f"child {i} failed:\n{err[-3000:]}" for i, err in failed))
    return [out for out, _ in outs]


# ----------------------------------------------------------------------------- tf.data service

def _child_service(out: Path, cache: Path) -> None:
    """Two worker processes; a finite dataset in distributed_epoch mode, then train_dataset."""
    from factories import COUNTS, OFF, cfg_with, decode_index, write_shards

    from tfpneumo.data.pipeline import train_dataset
    from tfpneumo.data.service import start_local_service, stop_local_service
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    truth = write_shards(cache, COUNTS)
    address, handles = start_local_service(2)
    try:
        from test_procs import descendants, listening_sockets

        listening = listening_sockets([os.getpid(), *descendants(os.getpid())])
        ds = tf.data.Dataset.range(N_IDS).map(
            lambda i: {"id": i, "x": tf.fill([8, 8], tf.cast(i, tf.float32))})
        epochs = []
        for epoch in range(2):  # a new job per epoch: each must again cover every element
            dist = ds.apply(tf.data.experimental.service.distribute(
                "distributed_epoch", address, job_name=f"ids-{epoch}"))
            elems = list(dist.as_numpy_iterator())
            assert all((e["x"] == e["id"]).all() for e in elems)
            epochs.append([int(e["id"]) for e in elems])

        # The real training stream through the service: un-augmented images carry their index.
        cfg = cfg_with(augment=OFF)
        train, steps = train_dataset(cache, 1, cfg, epochs=2, service=address)
        batches = list(train.take(6).as_numpy_iterator())
        ids = np.concatenate([decode_index(images) for images, _ in batches]).tolist()
        shapes = [(images.shape, y["mask"].shape, y["label"].shape) for images, y in batches]
    finally:
        stop_local_service(handles)
    folds = {int(k[2:]): fold for k, (fold, _) in truth.items()}
    out.write_text(json.dumps({"epochs": epochs, "train_ids": ids, "train_folds": folds,
                               "shapes": [list(map(list, s)) for s in shapes],
                               "box_exit": handles.box.process.returncode,
                               "listening": listening, "address": address}))


def test_data_service_distributed_epoch_exactly_once(tmp_path):
    out = tmp_path / "service.json"
    run_children([[sys.executable, str(THIS), "service", str(out), str(tmp_path / "cache")]],
                 [child_env()])
    res = json.loads(out.read_text())
    for ids in res["epochs"]:
        assert sorted(ids) == list(range(N_IDS))  # every element once: none lost, none repeated
    # Training stream via the service: fold 1 is validation, so only fold-0 images appear.
    assert len(res["train_ids"]) == 6 * 8
    assert {res["train_folds"][str(i)] for i in res["train_ids"]} == {0}
    assert res["shapes"][0] == [[8, 64, 64, 1], [8, 64, 64, 1], [8, 1]]
    assert res["box_exit"] == 0  # the dispatcher and both workers stopped cleanly
    # On this machine's network, only loopback relays listen (TensorFlow's servers, which bind
    # every interface, are in the box's own network namespace): dispatcher + 2 workers.
    port = int(res["address"].rsplit(":", 1)[1])
    assert {host for host, _ in res["listening"]} == {"127.0.0.1"}
    assert len(res["listening"]) == 3 and ["127.0.0.1", port] in res["listening"]


def test_start_local_service_rejects_no_workers():
    from tfpneumo import TfpneumoError
    from tfpneumo.data.service import start_local_service

    with pytest.raises(TfpneumoError, match="n_workers 0"):
        start_local_service(0)


def _child_heavy_service(out: Path, cache: Path) -> None:
    """albumentations inside 2 service workers: exact per element against heavy_numpy run
    here, then the training stream with elastic on."""
    from factories import COUNTS, OFF, cfg_with, write_shards

    from tfpneumo.config import AugmentConfig
    from tfpneumo.data.augment import heavy_batch, heavy_numpy
    from tfpneumo.data.pipeline import train_dataset
    from tfpneumo.data.service import start_local_service, stop_local_service
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    aug = AugmentConfig(elastic_p=1.0, grid_distortion_p=0.5, clahe_p=0.5)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (N_HEAVY, 1, 48, 48, 1), dtype=np.uint8)
    masks = np.zeros_like(images)
    masks[:, :, 10:30, 12:36] = 1
    seeds = rng.integers(0, 2**31 - 1, (N_HEAVY, 1), dtype=np.int64)
    expected = [heavy_numpy(images[i], masks[i], seeds[i], aug) for i in range(N_HEAVY)]

    write_shards(cache, COUNTS)
    cfg = cfg_with(augment={**OFF, "elastic_p": 1.0})
    plain = list(train_dataset(cache, 1, cfg_with(augment=OFF), epochs=2)[0].take(4)
                 .as_numpy_iterator())
    address, handles = start_local_service(2, augments=[aug, cfg.augment])
    try:
        ds = tf.data.Dataset.range(N_HEAVY).map(
            lambda i: (i, *heavy_batch(tf.gather(images, i), tf.gather(masks, i),
                                       tf.gather(seeds, i), aug)))
        ds = ds.apply(tf.data.experimental.service.distribute(
            "distributed_epoch", address, job_name="heavy-elements"))
        got = list(ds.as_numpy_iterator())
        train = list(train_dataset(cache, 1, cfg, epochs=2, service=address)[0].take(4)
                     .as_numpy_iterator())
    finally:
        stop_local_service(handles)
    masks_out = np.stack([y["mask"] for _, y in train])
    out.write_text(json.dumps({
        "ids": sorted(int(i) for i, _, _ in got),
        "exact": all(np.array_equal(img, expected[i][0]) and np.array_equal(msk, expected[i][1])
                     for i, img, msk in got),
        "changed": all(not np.array_equal(img, images[i]) for i, img, _ in got),
        "binary_masks": bool(np.isin(masks_out, [0.0, 1.0]).all()),
        "shapes": [list(x.shape) for x, _ in train],
        "distinct_batches": len({x.tobytes() for x, _ in train}),
        "plain_shapes": [list(x.shape) for x, _ in plain],
    }))


N_HEAVY = 12


def test_heavy_augmentations_run_in_service_workers(tmp_path):
    """The albumentations op is named by a token of the settings (augment.register_heavy), so a
    worker process that registered them runs it (with tf.numpy_function it failed: "Could not
    find callback with key=pyfunc_0"). Oracle: heavy_numpy on the same inputs in this child."""
    out = tmp_path / "heavy.json"
    run_children([[sys.executable, str(THIS), "heavy", str(out), str(tmp_path / "cache")]],
                 [child_env()])
    res = json.loads(out.read_text())
    assert res["ids"] == list(range(N_HEAVY))  # every element once, over both workers
    assert res["exact"] and res["changed"]
    assert res["binary_masks"] and res["distinct_batches"] == 4
    assert res["shapes"] == res["plain_shapes"] == [[8, 64, 64, 1]] * 4


def test_input_service_specs():
    from tfpneumo.data.service import input_service

    with input_service(None) as address:
        assert address is None
    with input_service("hostA:5050") as address:
        assert address == "grpc://hostA:5050"
    with input_service("grpc://10.0.0.2:5050") as address:
        assert address == "grpc://10.0.0.2:5050"


# ----------------------------------------------------------------------------- child entry

if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "service":
        _child_service(Path(args[0]), Path(args[1]))
    elif mode == "heavy":
        _child_heavy_service(Path(args[0]), Path(args[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
