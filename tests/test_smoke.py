"""The shortest path a newcomer takes: start, echo over TCP and Unix, stop."""

import signal
import socket

from conftest import exchange, recv_until


def test_echo_tcp_and_unix_then_term(supervisor, tmp_path):
    sv = supervisor('''
        [[service]]
        name = "echo"
        listen = ["tcp://127.0.0.1:0", "unix:run/echo.sock"]
        workers = 2
    ''')
    assert exchange(sv.tcp("echo"), b"hello\r\n") == b"hello\r\n"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(tmp_path / "run" / "echo.sock"))
        s.sendall(b"over unix\n")
        assert recv_until(s) == b"over unix\r\n"
    sv.signal(signal.SIGTERM)
    assert sv.wait_exit() == 0
    assert not (tmp_path / "run" / "echo.sock").exists()
    assert not (tmp_path / "run" / "preforkd.pid").exists()
    sv.wait_event("supervisor.stopped")
