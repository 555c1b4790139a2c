"""tfpneumo.procs: the network box of the local tf.data service, children that die with their
parent. A plain echo server stands in for TensorFlow's servers (it listens on every interface
as they do), so these tests take well under a second."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tfpneumo.procs import NamespaceUnavailable, start_box

TESTS_DIR = Path(__file__).resolve().parent


def _hex_address(text: str) -> tuple[str, int]:
    """``0100007F:1F90`` (/proc/net/tcp) or its 32-hex-digit IPv6 form -> (address, port)."""
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    # /proc prints each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(port, 16)


def listening_sockets(pids, net_of: int | str = "self") -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets in LISTEN state held by ``pids``, as seen in the
    network namespace of process ``net_of`` (sockets of other namespaces are not listed)."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # the process has gone
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{net_of}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                found.append(_hex_address(fields[1]))
    return found


def descendants(pid: int) -> list[int]:
    """Every living descendant of process ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _echo_server(payload, ports):
    """A box target: an echo server on every interface of the box, like TensorFlow's."""
    server = socket.create_server(("0.0.0.0", ports[0]))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server.close, {"pid": os.getpid()}


@pytest.fixture
def echo_box(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    try:
        box = start_box("test_procs:_echo_server", None, 1, timeout=20)
    except NamespaceUnavailable as e:
        pytest.skip(str(e))
    yield box
    box.stop()


def test_box_servers_are_reachable_on_loopback_only(echo_box):
    """The server inside listens on 0.0.0.0, yet on this machine's network only 127.0.0.1
    listens for it (the relay); a client on 127.0.0.1 reaches it."""
    pid, port = echo_box.process.pid, echo_box.ports[0]
    assert echo_box.info == {"pid": pid}
    assert listening_sockets([pid, os.getpid()]) == [("127.0.0.1", port)]
    assert ("0.0.0.0", port) in listening_sockets([pid], net_of=pid)  # inside the box only
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"hello box")
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(100) == b"hello box"


def test_box_stops_when_its_stdin_closes(echo_box):
    echo_box.stop(timeout=5)
    assert echo_box.process.returncode == 0
    assert listening_sockets([os.getpid()]) == []


def test_box_reports_a_failing_target_in_one_line(monkeypatch):
    from tfpneumo.procs import BoxError

    try:
        with pytest.raises(BoxError, match="No module named 'no_such_module'"):
            start_box("no_such_module:f", None, 1, timeout=20)
    except NamespaceUnavailable as e:
        pytest.skip(str(e))


# ----------------------------------------------------------------------------- die_with_parent

POOL_CHILD = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from tfpneumo.data.prepare import _worker_init

pool = ProcessPoolExecutor(2, initializer=_worker_init, initargs=(os.getpid(),),
                           mp_context=multiprocessing.get_context("spawn"))
for f in [pool.submit(time.sleep, 0.3) for _ in range(2)]:
    f.result()
print(*pool._processes, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (its new parent may not reap it at once)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_prepare_workers_die_with_a_killed_parent():
    """The pool of ``prepare`` (its initializer, spawn workers): kill -9 of the parent takes
    the workers with it instead of leaving them to PID 1."""
    proc = subprocess.Popen([sys.executable, "-c", POOL_CHILD], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_die_with_parent_exits_when_the_parent_is_already_gone():
    """The race: the parent died before the child asked to die with it (the child's parent is
    then another process than the one named)."""
    code = "from tfpneumo.procs import die_with_parent; die_with_parent(-5); print('alive')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and out.stdout == ""
    code = "import os; from tfpneumo.procs import die_with_parent; die_with_parent(os.getppid()); print('alive')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == "alive\n"


def test_local_service_without_namespaces_runs_in_this_process(monkeypatch, capsys):
    """Where no private network namespace can be made, ``data.service: local`` warns in one
    line and preprocesses in the training process rather than open ports to the network."""
    from tfpneumo.data import service

    def refuse(n, augments=()):
        raise NamespaceUnavailable("no private network namespace on this machine "
                                   "(OSError: [Errno 1] unshare: Operation not permitted)")

    monkeypatch.setattr(service, "start_local_service", refuse)
    with service.input_service("local:2") as address:
        assert address is None
    err = capsys.readouterr().err
    assert err.startswith("warning: data.service local:2: no private network namespace") and \
        err.count("\n") == 1, err
