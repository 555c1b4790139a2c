"""A local tf.data service: one dispatcher in this process, preprocessing workers in others.

``tf.data.experimental.service`` moves a dataset's preprocessing (parse, augment, batch) into
separate worker servers; the training process only reads finished batches over gRPC. Here the
workers are local *processes* (multiprocessing spawn), so preprocessing is no longer bound to
the one Python process and its GIL-held ``tf.numpy_function`` calls. Use::

    address, handles = start_local_service(2)
    try:
        ds, steps = train_dataset(cache, fold, cfg, epochs=e, service=address)
        ...
    finally:
        stop_local_service(handles)

Only 127.0.0.1 is used; ports are chosen by the OS (port 0).

Limit: a dataset that calls ``tf.numpy_function`` / ``tf.py_function`` (the albumentations
"heavy" augmentations) cannot run in a tf.data service worker, because the Python callable
lives only in the process that built the graph.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from typing import Any

from tfpneumo import TfpneumoError

__all__ = ["LocalService", "ServiceError", "start_local_service", "stop_local_service"]

HOST = "127.0.0.1"


class ServiceError(TfpneumoError):
    """The local tf.data service could not be started."""


@dataclass
class LocalService:
    """What :func:`stop_local_service` needs: the dispatcher server and the worker processes."""

    dispatcher: Any  # tf.data.experimental.service.DispatchServer
    address: str  # "grpc://127.0.0.1:port"
    workers: list[mp.Process] = field(default_factory=list)


def _worker_main(dispatcher_address: str, parent_pid: int) -> None:
    """Body of one worker process: a WorkerServer registered with the dispatcher, serving until
    the process is terminated or its parent is gone (a killed parent cannot clean up its
    daemonic children, and ``WorkerServer.join`` would block forever)."""
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    config = tf.data.experimental.service.WorkerConfig(
        dispatcher_address=dispatcher_address, worker_address=f"{HOST}:%port%", port=0)
    worker = tf.data.experimental.service.WorkerServer(config)  # serves from here on
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    worker.stop()


def start_local_service(n_workers: int, timeout: float = 60.0) -> tuple[str, LocalService]:
    """Starts a dispatcher here and ``n_workers`` worker processes; waits until they registered.

    Args:
        n_workers: number of worker processes (>= 1).
        timeout: seconds to wait for every worker to register with the dispatcher.

    Returns:
        ``(address, handles)``: the dispatcher address ``"grpc://127.0.0.1:port"`` to pass to
        ``tf.data.experimental.service.distribute`` (or ``train_dataset(service=...)``), and the
        handles for :func:`stop_local_service`. Keep the handles alive while the service is used:
        the dispatcher stops when they are garbage-collected.

    Raises:
        ServiceError: ``n_workers < 1``, a worker died, or the workers did not register in time.
    """
    if n_workers < 1:
        raise ServiceError(f"n_workers {n_workers}: must be >= 1")
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    dispatcher = tf.data.experimental.service.DispatchServer(
        tf.data.experimental.service.DispatcherConfig(port=0))
    port = int(dispatcher._address.rsplit(":", 1)[1])  # the OS-chosen port (no public getter)
    handles = LocalService(dispatcher, f"grpc://{HOST}:{port}")
    # spawn, not fork: a forked child would inherit this process's TensorFlow runtime threads.
    ctx = mp.get_context("spawn")
    try:
        for _ in range(n_workers):
            proc = ctx.Process(target=_worker_main, args=(f"{HOST}:{port}", os.getpid()),
                               daemon=True)
            proc.start()
            handles.workers.append(proc)
        deadline = time.monotonic() + timeout
        # _num_workers is private but the only way to know the workers are there; without the
        # wait, a job started early runs on the first worker alone.
        while dispatcher._num_workers() < n_workers:
            dead = [p.pid for p in handles.workers if not p.is_alive()]
            if dead:
                raise ServiceError(f"tf.data service worker process(es) {dead} exited at start")
            if time.monotonic() > deadline:
                raise ServiceError(f"only {dispatcher._num_workers()} of {n_workers} tf.data "
                                   f"service workers registered within {timeout:g} s")
            time.sleep(0.1)
    except BaseException:
        stop_local_service(handles)
        raise
    return handles.address, handles


def stop_local_service(handles: LocalService, timeout: float = 10.0) -> None:
    """Terminates the worker processes (killing those that do not exit) and the dispatcher."""
    for proc in handles.workers:
        if proc.is_alive():
            proc.terminate()
    for proc in handles.workers:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout)
    handles.workers.clear()
    handles.dispatcher.stop()
