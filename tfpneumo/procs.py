"""Child processes that cannot outlive their parent or be reached from the network.

:func:`die_with_parent`: a child process (a ``prepare`` worker) is killed by the kernel when
its parent dies, even by kill -9 (Linux ``PR_SET_PDEATHSIG``; elsewhere it does nothing).

:func:`start_box`: servers in a child process that only this machine can reach. TensorFlow's
tf.data service servers listen on every interface: ``0.0.0.0:port`` is hard-coded in
``GrpcDataServerBase::Start`` (tensorflow/core/data/service/server_lib.cc), no config key
(``DispatcherConfig``, ``WorkerConfig``: ``worker_address`` is only the name the server is
announced by) chooses the address, and the only gRPC credentials registered are insecure. So
the servers run in a *box*: a child that first moves into a new network namespace (a new user
namespace too, which needs no privilege where unprivileged user namespaces are allowed) whose
only interface is its own loopback, so nothing outside can route to them. For each port the
servers use, this process listens on ``127.0.0.1`` (same port number) in the machine's
namespace and hands the socket to the box, which relays every connection to that port on the
box's loopback. Clients on this machine use ``127.0.0.1:port`` as if the servers were here.

The box reads its instructions from stdin and stops when stdin closes, so it also stops when
its parent dies.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tfpneumo.errors import TfpneumoError, first_line

__all__ = ["Box", "BoxError", "NamespaceUnavailable", "die_with_parent", "start_box"]

_PR_SET_PDEATHSIG = 1
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent_pid: int) -> None:
    """Makes the kernel SIGKILL this process when its parent dies (Linux; a no-op elsewhere).

    ``parent_pid`` is the parent this process was started by: if it is already gone (it died
    before the request was made, and this process was adopted), this process exits now.
    The kernel's signal follows the parent *thread* that started this process, so start such
    children from a thread that lives as long as they should (the main thread).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = _libc()
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not available (a sandbox): the parent's own clean-up still applies
    if os.getppid() != parent_pid:
        os._exit(1)


class BoxError(TfpneumoError):
    """The boxed servers could not be started."""


class NamespaceUnavailable(BoxError):
    """This machine does not let the process make a private network namespace."""


@dataclass
class Box:
    """A running box: its process and the loopback ports its servers are reached on."""

    process: subprocess.Popen
    ports: list[int] = field(default_factory=list)
    info: Any = None  # what the target reported when it was ready

    def stop(self, timeout: float = 15.0) -> None:
        """Closes the box's stdin (it stops its servers and exits); kills it after ``timeout``."""
        if self.process.stdin and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


def start_box(target: str, payload, n_ports: int, timeout: float = 120.0) -> Box:
    """Starts ``target`` (``"module:function"``) in a box; returns when it is serving.

    The box calls ``function(payload, ports)`` inside its namespace: it must start servers on
    ``ports`` (any address) and return ``(stop, info)``: a callable that stops them and
    JSON data for :attr:`Box.info`. ``payload`` is pickled.

    Raises:
        NamespaceUnavailable: no private network namespace can be made here.
        BoxError: the target failed, or the box was not ready within ``timeout`` seconds.
    """
    listeners = []
    proc = None
    try:
        for _ in range(n_ports):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listeners.append(s)
            s.bind(("127.0.0.1", 0))
            s.listen(64)
        ports = [s.getsockname()[1] for s in listeners]
        fds = [s.fileno() for s in listeners]
        # The same tfpneumo as this process's, wherever it was imported from.
        here = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [here, *filter(None, [os.environ.get("PYTHONPATH")])])}
        proc = subprocess.Popen(
            [sys.executable, "-c", "from tfpneumo.procs import _box_main; _box_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=fds, env=env,
            start_new_session=True)  # a Ctrl-C is for the parent, which then stops the box
        msg = pickle.dumps({"target": target, "payload": payload, "ports": ports, "fds": fds})
        proc.stdin.write(struct.pack("<Q", len(msg)) + msg)
        proc.stdin.flush()
        line = _read_line(proc, timeout)
    except BaseException:
        if proc is not None:
            proc.kill()
            proc.wait()
        raise
    finally:
        for s in listeners:
            s.close()
    box = Box(proc, ports)
    if line.startswith("ready "):
        box.info = json.loads(line.removeprefix("ready "))
        return box
    box.stop()
    kind, _, text = line.partition(": ")
    if kind == "nonamespace":
        raise NamespaceUnavailable(f"no private network namespace on this machine ({text})")
    raise BoxError(text or f"boxed servers exited at start (exit code {proc.returncode})")


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The box's one status line, or ``"error: ..."`` on a timeout or an early exit."""
    deadline = time.monotonic() + timeout
    data = b""
    fd = proc.stdout.fileno()
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return f"error: boxed servers not ready within {timeout:g} s"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    text = data.decode(errors="replace").strip()
    return text or f"error: boxed servers exited at start (exit code {proc.wait()})"


# ----------------------------------------------------------------------------- inside the box

def _enter_namespace() -> None:
    """Moves this (single-threaded) process into a new network namespace with loopback up."""
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        # Keep this process's identity inside (files it makes belong to the same user).
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    elif libc.unshare(_CLONE_NEWNET) != 0:  # privileged, where user namespaces are off
        code = ctypes.get_errno()
        raise OSError(code, f"unshare: {os.strerror(code)}")
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
        flags = struct.unpack("16sH22x", ifreq)[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 20):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass


def _relay(listener: socket.socket, port: int) -> None:
    """Accepts on ``listener`` (the machine's 127.0.0.1) and joins each connection to
    ``127.0.0.1:port`` in the box."""
    while True:
        try:
            outside, _ = listener.accept()
        except OSError:
            return
        try:
            inside = socket.create_connection(("127.0.0.1", port))
        except OSError:
            outside.close()  # not serving yet: the client retries
            continue
        for sock in (outside, inside):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def run(a=outside, b=inside):
            t = threading.Thread(target=_pump, args=(b, a), daemon=True)
            t.start()
            _pump(a, b)
            t.join()
            a.close()
            b.close()

        threading.Thread(target=run, daemon=True).start()


def _box_main() -> None:
    """The box process: reads its instructions, enters the namespace, relays, serves until
    stdin closes. Prints one status line: ``ready <info as JSON>``, ``nonamespace: ...`` or ``error: ...``."""
    stdin = sys.stdin.buffer
    (size,) = struct.unpack("<Q", stdin.read(8))
    msg = pickle.loads(stdin.read(size))  # from our parent over a pipe
    try:
        _enter_namespace()
    except OSError as e:
        print(f"nonamespace: {first_line(e)}", flush=True)
        sys.exit(1)
    try:
        for fd, port in zip(msg["fds"], msg["ports"], strict=True):
            listener = socket.socket(fileno=fd)
            threading.Thread(target=_relay, args=(listener, port), daemon=True).start()
        module, _, name = msg["target"].partition(":")
        import importlib

        stop, info = getattr(importlib.import_module(module), name)(msg["payload"], msg["ports"])
    except Exception as e:  # noqa: BLE001 - reported to the parent as its one line
        print(f"error: {e if isinstance(e, TfpneumoError) else first_line(e)}", flush=True)
        sys.exit(1)
    print(f"ready {json.dumps(info)}", flush=True)
    try:
        while stdin.read(65536):
            pass
    except OSError as e:
        if e.errno != errno.EINTR:
            raise
    stop()
    os._exit(0)  # daemon relay threads may still be blocked in accept
