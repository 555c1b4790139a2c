"""tf.data service for the training input: a dispatcher and preprocessing worker processes.

``tf.data.experimental.service`` moves a dataset's preprocessing (parse, augment, batch) into
separate worker servers; the training process only reads finished batches over gRPC. The
workers are separate *processes*, so preprocessing is no longer bound to the training process
and its GIL (the albumentations "heavy" transforms are Python).

On one machine (what ``data.service: local:N`` does in ``tfpneumo train``)::

    address, handles = start_local_service(2, augments=[cfg.augment])
    try:
        ds, steps = train_dataset(cache, fold, cfg, epochs=e, service=address)
        ...
    finally:
        stop_local_service(handles)

Across machines: ``tfpneumo data-service --port 5050`` (dispatcher) on one host,
``tfpneumo data-worker --dispatcher HOST:5050 --config CFG`` on each preprocessing host, and
``--set data.service=grpc://HOST:5050`` for training (:func:`serve_dispatcher`,
:func:`serve_worker`).

A worker can run the heavy transforms of the augmentation settings it registered
(:func:`tfpneumo.data.augment.register_heavy`; ``augments`` here, ``--config`` for
``data-worker``): the graph names its Python callable by a token derived from the settings.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tfpneumo.errors import TfpneumoError

__all__ = ["LocalService", "ServiceError", "input_service", "serve_dispatcher", "serve_worker",
           "start_local_service", "stop_local_service"]

HOST = "127.0.0.1"


class ServiceError(TfpneumoError):
    """The local tf.data service could not be started."""


@dataclass
class LocalService:
    """What :func:`stop_local_service` needs: the dispatcher server and the worker processes."""

    dispatcher: Any  # tf.data.experimental.service.DispatchServer
    address: str  # "grpc://127.0.0.1:port"
    workers: list[mp.Process] = field(default_factory=list)


def _start_worker(dispatcher_address: str, augments, host: str, port: int):
    """Registers the heavy transforms of ``augments`` then starts a WorkerServer (serving)."""
    from tfpneumo.data.augment import register_heavy
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    for aug in augments:
        if aug.heavy:
            register_heavy(aug)
    config = tf.data.experimental.service.WorkerConfig(
        dispatcher_address=dispatcher_address, worker_address=f"{host}:%port%", port=port)
    return tf.data.experimental.service.WorkerServer(config)


def _worker_main(dispatcher_address: str, parent_pid: int, augments) -> None:
    """Body of one local worker process: serves until terminated or its parent is gone (a
    killed parent cannot clean up its daemonic children, and ``WorkerServer.join`` would block
    forever)."""
    worker = _start_worker(dispatcher_address, augments, HOST, 0)
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    worker.stop()


def serve_worker(dispatcher_address: str, augments=(), host: str | None = None,
                 port: int = 0) -> None:
    """Runs a worker for a (possibly remote) dispatcher in this process until interrupted.

    Args:
        dispatcher_address: ``host:port`` or ``grpc://host:port`` of the dispatcher.
        augments: AugmentConfigs whose heavy transforms this worker must run.
        host: the name the trainer reaches this worker by (default: this machine's FQDN).
        port: the worker's port (0: chosen by the OS).
    """
    import socket

    address = dispatcher_address.removeprefix("grpc://")
    worker = _start_worker(address, list(augments), host or socket.getfqdn(), port)
    worker.join()


def serve_dispatcher(port: int) -> None:
    """Runs a dispatcher on ``port`` (all interfaces) in this process until interrupted."""
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    dispatcher = tf.data.experimental.service.DispatchServer(
        tf.data.experimental.service.DispatcherConfig(port=port))
    dispatcher.join()


def start_local_service(n_workers: int, augments=(), timeout: float = 60.0
                        ) -> tuple[str, LocalService]:
    """Starts a dispatcher here and ``n_workers`` worker processes; waits until they registered.

    Args:
        n_workers: number of worker processes (>= 1).
        augments: AugmentConfigs whose heavy (albumentations) transforms the workers must run.
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
            proc = ctx.Process(target=_worker_main,
                               args=(f"{HOST}:{port}", os.getpid(), tuple(augments)), daemon=True)
            proc.start()
            handles.workers.append(proc)
        deadline = time.monotonic() + timeout
        from tfpneumo import compat

        # Without the wait, a job started early runs on the first worker alone.
        while compat.service_worker_count(dispatcher) < n_workers:
            dead = [p.pid for p in handles.workers if not p.is_alive()]
            if dead:
                raise ServiceError(f"tf.data service worker process(es) {dead} exited at start")
            if time.monotonic() > deadline:
                raise ServiceError(f"only {compat.service_worker_count(dispatcher)} of {n_workers} tf.data "
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


@contextlib.contextmanager
def input_service(spec: str | None, augments=()) -> Iterator[str | None]:
    """The tf.data service named by the config key ``data.service``, for a ``with`` block.

    ``None`` yields None (preprocessing in this process); ``local`` / ``local:N`` starts a
    dispatcher and N worker processes here (N = usable cores for ``local``) that run the heavy
    transforms of ``augments``, stopped when the block ends; ``grpc://host:port`` (or
    ``host:port``) yields that running dispatcher's address.
    """
    if spec is None:
        yield None
    elif spec == "local" or spec.startswith("local:"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        n = int(spec.split(":")[1]) if ":" in spec else cores or 1
        address, handles = start_local_service(n, augments=augments)
        try:
            yield address
        finally:
            stop_local_service(handles)
    else:
        yield spec if spec.startswith("grpc://") else f"grpc://{spec}"
