"""Line protocols over real sockets: framing, limits, bad clients, built-ins, handler API.

Every test runs three times: with one-connection workers, and with event-driven workers
(``worker_connections > 1``) on asyncio's loop and on uvloop's, which must behave
exactly alike: same replies, same limits, same events.
"""

import socket
import struct
import textwrap
import threading

import pytest

from conftest import connect, exchange, recv_all, recv_until, wait_for


def event_driven(body: str, loop: str) -> str:
    """*body* with ``worker_connections = 16`` in every service and *loop* as the
    supervisor's ``event_loop``."""
    text = textwrap.dedent(body)
    text = text.replace("[[service]]\n", "[[service]]\nworker_connections = 16\n")
    if "[supervisor]" in text:
        return text.replace("[supervisor]\n", f'[supervisor]\nevent_loop = "{loop}"\n', 1)
    return (f'[supervisor]\npidfile = "run/preforkd.pid"\ncontrol_socket = "run/preforkd.sock"\n'
            f'graceful_timeout = 10\nevent_loop = "{loop}"\n' + text)


@pytest.fixture(params=["sync", "asyncio", "uvloop"])
def kind(request):
    """The worker model under test."""
    return request.param


@pytest.fixture
def supervisor(supervisor, kind):
    """The harness's supervisor factory, with event-driven workers unless *kind* is sync."""
    if kind == "sync":
        return supervisor

    def start(body, **kw):
        return supervisor(event_driven(body, kind), **kw)
    return start

ONE_WORKER = '''
[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:0"]
workers = 1
idle_timeout = 1.5
max_line_length = 64
'''


def test_hundreds_of_short_connections_from_concurrent_clients(supervisor):
    sv = supervisor('''
        [[service]]
        name = "echo"
        listen = ["tcp://127.0.0.1:0"]
        workers = 4
    ''')
    addr = sv.tcp("echo")
    errors, done = [], []

    def client(n):
        for i in range(50):
            msg = f"client {n} message {i}".encode()
            try:
                got = exchange(addr, msg + b"\r\n")
            except OSError as exc:
                errors.append(repr(exc))
                continue
            if got != msg + b"\r\n":
                errors.append(got)
            else:
                done.append(1)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert len(done) == 400
    served = sum(w["connections"] for svc in sv.status()["services"] for w in svc["workers"])
    assert served >= 400


def test_crlf_lf_pipelined_and_unterminated_last_line(supervisor):
    sv = supervisor(ONE_WORKER)
    addr = sv.tcp("echo")
    assert exchange(addr, b"crlf\r\n") == b"crlf\r\n"
    assert exchange(addr, b"lf\n") == b"lf\r\n"
    assert exchange(addr, b"a\r\nb\nc\r\n", expect_lines=3) == b"a\r\nb\r\nc\r\n"
    assert exchange(addr, b"\n") == b"\r\n"
    with connect(addr) as s:
        s.sendall(b"first\nlast-without-newline")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"first\r\nlast-without-newline\r\n"
    with connect(addr) as s:  # a line split across many sends
        for ch in b"slow line":
            s.sendall(bytes([ch]))
        s.sendall(b"\r\n")
        assert recv_until(s) == b"slow line\r\n"


def test_oversized_line_gets_error_and_close_worker_survives(supervisor):
    sv = supervisor(ONE_WORKER)
    addr = sv.tcp("echo")
    pid = sv.worker_pids()[0]
    with connect(addr) as s:
        s.sendall(b"ok\n" + b"x" * 65 + b"\n")
        assert recv_all(s) == b"ok\r\nERROR line too long (max 64 bytes)\r\n"
    with connect(addr) as s:  # no newline at all: the buffer must not grow without bound
        try:
            s.sendall(b"y" * 100_000)
        except OSError:
            pass
        assert recv_all(s).endswith(b"ERROR line too long (max 64 bytes)\r\n")
    assert exchange(addr, b"x" * 64 + b"\n") == b"x" * 64 + b"\r\n"  # exactly the limit is fine
    sv.wait_event("connection.line_too_long")
    assert sv.worker_pids() == [pid]


def test_binary_garbage_costs_one_connection(supervisor):
    sv = supervisor(ONE_WORKER)
    addr = sv.tcp("echo")
    pid = sv.worker_pids()[0]
    with connect(addr) as s:
        s.sendall(bytes(range(128, 188)) + b"\n")
        assert recv_all(s) == b"ERROR invalid UTF-8\r\n"
    with connect(addr) as s:
        s.sendall(b"\x00\xff\xfe\r\n")
        assert recv_all(s) == b"ERROR invalid UTF-8\r\n"
    assert exchange(addr, "héllo wörld\n".encode()) == "héllo wörld\r\n".encode()
    sv.wait_event("connection.bad_encoding")
    assert sv.worker_pids() == [pid]


def test_idle_client_is_timed_out(supervisor):
    sv = supervisor(ONE_WORKER)
    addr = sv.tcp("echo")
    with connect(addr, timeout=20) as s:
        s.sendall(b"hi\n")
        assert recv_until(s) == b"hi\r\n"
        assert recv_all(s) == b"ERROR idle timeout\r\n"  # then EOF
    ev = sv.wait_event("connection.idle_timeout")
    assert ev["service"] == "echo" and "peer" in ev
    assert exchange(addr, b"still here\n") == b"still here\r\n"


def test_client_reset_mid_reply_costs_one_connection(supervisor):
    sv = supervisor(ONE_WORKER.replace("max_line_length = 64", "max_line_length = 2000000"))
    addr = sv.tcp("echo")
    pid = sv.worker_pids()[0]
    for _ in range(3):
        s = connect(addr)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall((b"z" * 1_000_000 + b"\n") * 2)  # replies larger than the socket buffers
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST while the worker is still writing
    sv.wait_event("connection.reset")
    assert exchange(addr, b"after resets\n") == b"after resets\r\n"
    assert sv.worker_pids() == [pid]


def test_handler_that_raises_costs_one_connection(supervisor, tmp_path):
    (tmp_path / "raiser.py").write_text(
        "def handle(line):\n"
        "    if line == 'boom':\n"
        "        raise ValueError('handler bug')\n"
        "    return line.upper()\n")
    sv = supervisor('''
        [supervisor]
        pidfile = "run/p.pid"
        control_socket = "run/p.sock"
        python_path = ["."]
        [[service]]
        name = "raiser"
        listen = ["tcp://127.0.0.1:0"]
        handler = "raiser:handle"
        workers = 1
    ''')
    addr = sv.tcp("raiser")
    pid = sv.worker_pids()[0]
    with connect(addr) as s:
        s.sendall(b"ok\nboom\nnever\n")
        assert recv_all(s) == b"OK\r\nERROR internal error\r\n"
    ev = sv.wait_event("connection.handler_error")
    assert "ValueError: handler bug" in ev["error"]
    assert exchange(addr, b"fine\n") == b"FINE\r\n"
    assert sv.worker_pids() == [pid]


def test_daytime_rfc867(supervisor):
    sv = supervisor('''
        [[service]]
        name = "daytime"
        listen = ["tcp://127.0.0.1:0"]
        handler = "preforkd.services:daytime"
        workers = 1
    ''')
    with connect(sv.tcp("daytime")) as s:
        data = recv_all(s)  # one line, then the server closes
    assert data.endswith(b"\r\n") and data.count(b"\r\n") == 1
    assert b"UTC" in data


def test_line_handler_class_and_connection_handler(supervisor, tmp_path, kind):
    from conftest import ROOT

    if kind != "sync":
        pytest.skip("a @connection_handler needs worker_connections = 1 (test_capacity covers classes)")

    sv = supervisor(f'''
        [supervisor]
        pidfile = "run/p.pid"
        control_socket = "run/p.sock"
        python_path = ["{ROOT / "examples"}"]
        [[service]]
        name = "ping"
        listen = ["tcp://127.0.0.1:0"]
        handler = "handlers:ping"
        workers = 1
        [[service]]
        name = "counter"
        listen = ["tcp://127.0.0.1:0"]
        handler = "handlers:Counter"
        workers = 1
        [[service]]
        name = "shout"
        listen = ["tcp://127.0.0.1:0"]
        handler = "handlers:shout"
        workers = 1
    ''')
    with connect(sv.tcp("ping")) as s:
        s.sendall(b"PING\r\nhello\r\nquit\r\n")
        assert recv_all(s) == b"+PONG\r\nhello\r\n+BYE\r\n"
    with connect(sv.tcp("counter")) as s:
        assert recv_until(s).startswith(b"+OK counter ready")
        s.sendall(b"a\nb\nquit\n")
        assert recv_all(s) == b"1: a\r\n2: b\r\n+BYE after 2 lines\r\n"
    with connect(sv.tcp("shout")) as s:
        assert recv_until(s).startswith(b"+OK")
        s.sendall(b"quiet please\n\n")
        assert recv_all(s) == b"QUIET PLEASE\r\n"


def test_unix_listener_mode_and_echo(supervisor, tmp_path):
    import os
    import stat

    sv = supervisor('''
        [[service]]
        name = "echo"
        listen = ["unix:run/sub/echo.sock"]
        socket_mode = "0600"
        workers = 1
    ''')
    path = tmp_path / "run" / "sub" / "echo.sock"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"unix line\r\n")
        assert recv_until(s) == b"unix line\r\n"
    st = sv.status()
    assert st["services"][0]["listeners"][0]["address"] == f"unix:{path}"
    wait_for(lambda: sv.status()["services"][0]["workers"][0]["connections"] == 1)


def test_server_close_lingers_so_the_last_reply_is_not_lost(supervisor):
    """A reply followed by a close must reach a client whose input the server did not
    read (a daytime client that typed a line; lines pipelined after "quit"): a plain
    close with unread input resets the connection and destroys the reply."""
    from conftest import ROOT

    sv = supervisor(f'''
        [supervisor]
        pidfile = "run/p.pid"
        control_socket = "run/p.sock"
        python_path = ["{ROOT / "examples"}"]
        [[service]]
        name = "daytime"
        listen = ["tcp://127.0.0.1:0"]
        handler = "preforkd.services:daytime"
        workers = 1
        [[service]]
        name = "ping"
        listen = ["tcp://127.0.0.1:0"]
        handler = "handlers:ping"
        workers = 1
    ''')
    for _ in range(20):
        with connect(sv.tcp("daytime")) as s:
            s.sendall(b"what time is it?\r\n")
            data = recv_all(s)
            assert data.endswith(b"-UTC\r\n") and data.count(b"\r\n") == 1
        with connect(sv.tcp("ping")) as s:
            s.sendall(b"QUIT\r\n" + b"unread " * 30000 + b"\r\n")
            assert recv_until(s) == b"+BYE\r\n"


def test_idle_timeout_on_unix_connection(supervisor, tmp_path):
    supervisor('''
        [[service]]
        name = "echo"
        listen = ["unix:run/echo.sock"]
        workers = 1
        idle_timeout = 1
    ''')
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(tmp_path / "run" / "echo.sock"))
        assert recv_all(s) == b"ERROR idle timeout\r\n"


def test_client_that_stops_reading_is_timed_out(supervisor):
    """A client that keeps sending but never reads fills the socket buffers; the worker's
    writes then time out after idle_timeout and only that connection is lost."""
    sv = supervisor(ONE_WORKER.replace("max_line_length = 64", "max_line_length = 2000000")
                    .replace("idle_timeout = 1.5", "idle_timeout = 1"))
    addr = sv.tcp("echo")
    pid = sv.worker_pids()[0]
    s = connect(addr, timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def writer():
        try:
            for _ in range(100):
                s.sendall(b"y" * 1_000_000 + b"\n")
        except OSError:
            pass  # the server gave up on us

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        ev = sv.wait_event("connection.idle_timeout")
        assert ev["error"] == "client stopped reading"
        assert exchange(addr, b"next\n") == b"next\r\n"
        assert sv.worker_pids() == [pid]
    finally:
        try:
            s.shutdown(socket.SHUT_RDWR)  # wakes the writer if it is still blocked
        except OSError:
            pass
        t.join(30)
        s.close()
