"""``tfpneumo data-service`` / ``data-worker``: one-line errors on bad ports and dispatchers
(in process, before TensorFlow), the exposure warning, and Ctrl-C stopping a dispatcher."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from tfpneumo.cli import app


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("port", ["70000", "0", "-1"])
def test_data_service_rejects_a_port_out_of_range(port):
    assert one_line_error(["data-service", "--port", port]) == (
        f"error: data-service --port {port}: not a port (1..65535)")


@pytest.mark.parametrize("address", ["hostA", "hostA:", ":5050", "hostA:http", "hostA:70000",
                                     "grpc://hostA:0", "a b:5050"])
def test_data_worker_rejects_a_malformed_dispatcher(address):
    line = one_line_error(["data-worker", "--dispatcher", address])
    assert line.startswith(f"error: data-worker --dispatcher {address!r}"), line


def test_data_worker_rejects_an_unreachable_dispatcher():
    port = closed_port()
    line = one_line_error(["data-worker", "--dispatcher", f"127.0.0.1:{port}"])
    assert line.startswith(f"error: data-worker --dispatcher 127.0.0.1:{port}: cannot connect "
                           "within 5 s (ConnectionRefusedError"), line


def test_data_worker_rejects_its_own_port_out_of_range():
    assert one_line_error(["data-worker", "--dispatcher", "hostA:5050", "--port", "65536"]) == (
        "error: data-worker --port 65536: not a port (0..65535)")


def test_data_service_warns_and_stops_on_ctrl_c():
    """A running dispatcher (its port accepts connections) stops on SIGINT with exit code 130
    and one line; it warned that it listens on every interface (one TensorFlow start: ~5 s)."""
    port = closed_port()
    proc = subprocess.Popen([sys.executable, "-c", "from tfpneumo.cli import app; app()",
                             "data-service", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the dispatcher did not start"
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if not line.startswith(("I0000", "WARNING: All"))]
    assert lines[0] == (f"warning: the tf.data service dispatcher on port {port} listens on every "
                        'interface, unauthenticated: run it only inside a trusted network '
                        '(README: "Only inside a trusted network")')
    assert lines[-1] == "interrupted"


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
@pytest.mark.parametrize("command", ["data-service", "data-worker"])
def test_a_port_already_in_use_is_one_line(command, host):
    # Issue 11: TensorFlow's "Could not start gRPC server" was a RuntimeError traceback.
    with socket.socket() as taken:
        taken.bind((host, 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [command, "--port", str(port)]
        if command == "data-worker":
            args += ["--dispatcher", f"127.0.0.1:{closed_port()}"]  # the port is checked first
        assert one_line_error(args) == (
            f"error: {command} --port {port}: port already in use (another process listens "
            "on it); choose another port or stop that process")


def test_tensorflow_failing_to_start_a_server_is_one_line():
    """The port taken between the check and the start: TensorFlow's RuntimeError."""
    from tfpneumo.data.service import ServiceError, _started

    def start():
        raise RuntimeError("Could not start gRPC server")

    with pytest.raises(ServiceError) as e:
        _started(start, 5050, "data-service --port")
    assert str(e.value) == ("data-service --port 5050: cannot start the server (Could not start "
                            "gRPC server; is the port already in use?)")


def test_a_free_port_passes_the_check():
    from tfpneumo.data.service import check_port_free

    check_port_free(closed_port(), "data-service --port")
