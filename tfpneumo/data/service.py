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

TensorFlow's servers listen on every interface, unauthenticated (no option chooses the
address), so the local service runs in a private network namespace and this machine reaches
it through relays on 127.0.0.1 (:func:`tfpneumo.procs.start_box`).

Across machines: ``tfpneumo data-service --port 5050`` (dispatcher) on one host,
``tfpneumo data-worker --dispatcher HOST:5050 --config CFG`` on each preprocessing host, and
``--set data.service=grpc://HOST:5050`` for training (:func:`serve_dispatcher`,
:func:`serve_worker`); those listen on every interface and warn so: run them only inside a
trusted network (README).

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
from dataclasses import dataclass
from typing import Any

from tfpneumo.errors import TfpneumoError

__all__ = ["LocalService", "ServiceError", "input_service", "serve_dispatcher", "serve_worker",
           "start_local_service", "stop_local_service"]

HOST = "127.0.0.1"


class ServiceError(TfpneumoError):
    """The local tf.data service could not be started."""


@dataclass
class LocalService:
    """What :func:`stop_local_service` needs: the box of the dispatcher and workers."""

    box: Any  # tfpneumo.procs.Box
    address: str  # "grpc://127.0.0.1:port"

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the worker processes (for CPU accounting)."""
        return list(self.box.info["workers"])


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


def _worker_main(dispatcher_address: str, parent_pid: int, augments, port: int = 0) -> None:
    """Body of one local worker process: serves until terminated or its parent is gone (a
    killed parent cannot clean up its daemonic children, and ``WorkerServer.join`` would block
    forever)."""
    from tfpneumo.procs import die_with_parent

    die_with_parent(parent_pid)
    worker = _start_worker(dispatcher_address, augments, HOST, port)
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    worker.stop()


EXPOSED = ("listens on every interface, unauthenticated: run it only inside a trusted network "
           "(README: \"Only inside a trusted network\")")


def check_port(port: int, what: str, allow_zero: bool) -> int:
    """``port`` if it is a TCP port (1..65535, or 0 with ``allow_zero``); ServiceError naming
    ``what`` otherwise."""
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ServiceError(f"{what} {port}: not a port ({low}..65535)")
    return port


def check_port_free(port: int, what: str) -> None:
    """Raises ServiceError naming ``what`` and ``port`` when a server could not listen on
    ``port`` on every interface (as TensorFlow's gRPC servers do): another process holds it,
    or it needs privileges. TensorFlow itself only says "Could not start gRPC server"."""
    import errno
    import socket

    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this host
            continue
        with sock:
            # SO_REUSEADDR as gRPC sets it: a port whose last connections linger in TIME_WAIT
            # is free, one that a socket listens on (or is bound to) is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ServiceError(f"{what} {port}: port already in use (another process "
                                       "listens on it); choose another port or stop that "
                                       "process") from None
                if e.errno == errno.EACCES:
                    raise ServiceError(f"{what} {port}: permission denied (ports below 1024 "
                                       "need privileges); choose another port") from None
                if e.errno == errno.EADDRNOTAVAIL:  # IPv6 present but unusable
                    continue
                raise ServiceError(f"{what} {port}: cannot listen ({e.strerror or e})") from None


def _started(make, port: int, what: str):
    """``make()`` (a TensorFlow server on ``port``), its "Could not start gRPC server" (the port
    taken between :func:`check_port_free` and now) a ServiceError naming the port."""
    try:
        return make()
    except RuntimeError as e:
        raise ServiceError(f"{what} {port}: cannot start the server ({str(e).strip()}; is the "
                           "port already in use?)") from None


def parse_address(address: str, what: str) -> tuple[str, int]:
    """``(host, port)`` of ``host:port``, ``grpc://host:port`` or ``[v6]:port``; ServiceError
    naming ``what`` when it is not one."""
    rest = address.removeprefix("grpc://")
    host, sep, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or any(c in host for c in "/ @"):
        raise ServiceError(f"{what} {address!r}: expected HOST:PORT (e.g. hostA:5050)")
    return host, check_port(int(port), f"{what} {address!r}: port", allow_zero=False)


def check_reachable(address: str, what: str, timeout: float = 5.0) -> None:
    """Raises ServiceError naming ``what`` unless a TCP connection to ``address`` opens within
    ``timeout`` seconds."""
    import socket

    host, port = parse_address(address, what)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        from tfpneumo.errors import first_line

        raise ServiceError(f"{what} {address}: cannot connect within {timeout:g} s "
                           f"({first_line(e)})") from None


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
    worker = _started(lambda: _start_worker(address, list(augments), host or socket.getfqdn(),
                                            port), port, "data-worker --port")
    _serve_until_interrupted(worker)


def serve_dispatcher(port: int) -> None:
    """Runs a dispatcher on ``port`` (all interfaces) in this process until interrupted."""
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    dispatcher = _started(lambda: tf.data.experimental.service.DispatchServer(
        tf.data.experimental.service.DispatcherConfig(port=port)), port, "data-service --port")
    _serve_until_interrupted(dispatcher)


def _serve_until_interrupted(server) -> None:
    """Waits for SIGINT or SIGTERM, then stops ``server``. (``server.join()`` blocks in C++
    where Python never sees a Ctrl-C.)"""
    import signal
    import threading

    stop = threading.Event()
    received = []

    def handler(signum, frame):
        received.append(signum)
        stop.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        server.stop()
    if received and received[0] == signal.SIGINT:
        raise KeyboardInterrupt


def _serve_in_box(payload, ports: list[int]):
    """The local service inside its network namespace (:func:`tfpneumo.procs.start_box`):
    the dispatcher on ``ports[0]`` in this process, one worker process per other port; returns
    once every worker registered, with the callable that stops them all and the workers' pids."""
    n_workers, augments, timeout = payload
    from tfpneumo import compat
    from tfpneumo.tfimport import quiet_tensorflow

    tf = quiet_tensorflow()
    dispatcher = tf.data.experimental.service.DispatchServer(
        tf.data.experimental.service.DispatcherConfig(port=ports[0]))
    # spawn, not fork: a forked child would inherit this process's TensorFlow runtime threads.
    ctx = mp.get_context("spawn")
    workers: list[mp.Process] = []

    def stop() -> None:
        for proc in workers:
            if proc.is_alive():
                proc.terminate()
        for proc in workers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        dispatcher.stop()

    try:
        for port in ports[1:]:
            proc = ctx.Process(target=_worker_main,
                               args=(f"{HOST}:{ports[0]}", os.getpid(), tuple(augments), port),
                               daemon=True)
            proc.start()
            workers.append(proc)
        deadline = time.monotonic() + timeout
        # Without the wait, a job started early runs on the first worker alone.
        while compat.service_worker_count(dispatcher) < n_workers:
            dead = [p.pid for p in workers if not p.is_alive()]
            if dead:
                raise ServiceError(f"tf.data service worker process(es) {dead} exited at start")
            if time.monotonic() > deadline:
                raise ServiceError(f"only {compat.service_worker_count(dispatcher)} of {n_workers} "
                                   f"tf.data service workers registered within {timeout:g} s")
            time.sleep(0.1)
    except BaseException:
        stop()
        raise
    return stop, {"workers": [p.pid for p in workers]}


def start_local_service(n_workers: int, augments=(), timeout: float = 60.0
                        ) -> tuple[str, LocalService]:
    """Starts a dispatcher and ``n_workers`` worker processes reachable from this machine only;
    waits until the workers registered.

    TensorFlow's servers listen on every interface, so they run in a private network namespace
    behind loopback relays (:func:`tfpneumo.procs.start_box`, which says why and how).

    Args:
        n_workers: number of worker processes (>= 1).
        augments: AugmentConfigs whose heavy (albumentations) transforms the workers must run.
        timeout: seconds to wait for every worker to register with the dispatcher.

    Returns:
        ``(address, handles)``: the dispatcher address ``"grpc://127.0.0.1:port"`` to pass to
        ``tf.data.experimental.service.distribute`` (or ``train_dataset(service=...)``), and the
        handles for :func:`stop_local_service`.

    Raises:
        ServiceError: ``n_workers < 1``, a worker died, or the workers did not register in time.
        tfpneumo.procs.NamespaceUnavailable: this machine cannot make a private network
            namespace (unprivileged user namespaces off and no privilege).
    """
    if n_workers < 1:
        raise ServiceError(f"n_workers {n_workers}: must be >= 1")
    from tfpneumo.procs import start_box

    # The box's own start (Python, TensorFlow) comes on top of the workers' registration.
    box = start_box("tfpneumo.data.service:_serve_in_box", (n_workers, tuple(augments), timeout),
                    n_workers + 1, timeout=timeout + 60)
    handles = LocalService(box, f"grpc://{HOST}:{box.ports[0]}")
    return handles.address, handles


def stop_local_service(handles: LocalService, timeout: float = 15.0) -> None:
    """Stops the worker processes and the dispatcher (and their namespace)."""
    handles.box.stop(timeout)


@contextlib.contextmanager
def input_service(spec: str | None, augments=()) -> Iterator[str | None]:
    """The tf.data service named by the config key ``data.service``, for a ``with`` block.

    ``None`` yields None (preprocessing in this process); ``local`` / ``local:N`` starts a
    dispatcher and N worker processes here (N = usable cores for ``local``) that run the heavy
    transforms of ``augments``, stopped when the block ends; ``grpc://host:port`` (or
    ``host:port``) yields that running dispatcher's address.

    Where no private network namespace can be made, ``local`` warns on stderr and yields None
    rather than open unauthenticated ports on every interface.
    """
    if spec is None:
        yield None
    elif spec == "local" or spec.startswith("local:"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        n = int(spec.split(":")[1]) if ":" in spec else cores or 1
        from tfpneumo.procs import NamespaceUnavailable

        try:
            address, handles = start_local_service(n, augments=augments)
        except NamespaceUnavailable as e:
            import sys

            print(f"warning: data.service {spec}: {e}; preprocessing runs in the training process "
                  "(a tf.data service would listen on every interface, unauthenticated)",
                  file=sys.stderr)
            yield None
            return
        try:
            yield address
        finally:
            stop_local_service(handles)
    else:
        yield spec if spec.startswith("grpc://") else f"grpc://{spec}"
