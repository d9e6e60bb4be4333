"""Hostile clients against the event-driven worker (``worker_connections > 1``): clients
that send much and read nothing, half-close and read nothing, and a flow-controlled
pipeline that must still be answered whole and in order."""

from __future__ import annotations

import socket
import threading
import time

import psutil
import pytest

from conftest import connect, exchange, recv_all, recv_until, wait_for

HANDLERS = '''
import asyncio
import preforkd

def big(line):
    return line + " " + "x" * 4000

async def abig(line):
    await asyncio.sleep(0)
    return line + " " + "x" * 4000

def huge(line):
    reply = "z" * 20_000_000
    return preforkd.Close(reply) if line == "close" else reply

class Where(preforkd.LineHandler):
    """Replies with what its transport tells of the connection's two ends."""
    def on_line(self, line):
        t = self.conn.transport
        return "%s %s %s" % (t.get_extra_info("peername")[1], t.get_extra_info("sockname")[1],
                             t.get_write_buffer_limits()[1])

class Hoarder(preforkd.LineHandler):
    """Never paused for writing: what it writes stays queued in user space."""
    def on_connect(self):
        self.conn.transport.set_write_buffer_limits(high=1 << 30)
    def on_line(self, line):
        return "y" * (4 << 20)
'''


@pytest.fixture(params=["asyncio", "uvloop"])
def start(supervisor, tmp_path, request):
    (tmp_path / "hostile.py").write_text(HANDLERS)

    def go(handler: str, idle_timeout: float = 30):
        return supervisor(f'''
            [supervisor]
            pidfile = "run/p.pid"
            control_socket = "run/p.sock"
            graceful_timeout = 20
            event_loop = "{request.param}"
            python_path = ["."]
            [[service]]
            name = "svc"
            listen = ["tcp://127.0.0.1:0"]
            handler = "{handler}"
            workers = 1
            worker_connections = 50
            idle_timeout = {idle_timeout:g}
        ''')
    return go


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 1048576


def test_clients_that_send_much_and_read_nothing_do_not_swell_the_worker(start):
    """Five clients each send 256 KiB of one-byte lines (a 4 KB reply each) and read
    nothing: the worker answers while they read, then stops parsing until they do; it
    does not queue a reply for every line of a read (that was ~200 MiB per client), and
    a fresh client is still answered."""
    sv = start("hostile:big")
    addr = sv.tcp("svc")
    pid = sv.worker_pids()[0]
    before = rss_mib(pid)
    socks = []
    try:
        for _ in range(5):
            s = connect(addr, timeout=20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"a\n" * 131072)
            socks.append(s)
        # every one of them is paused on its output: 5 connections held, the worker still turns
        assert exchange(addr, b"fresh\n").startswith(b"fresh xxx")
        grown = rss_mib(pid) - before
        assert grown < 64, f"the worker grew by {grown:.0f} MiB for 5 clients that read nothing"
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("handler", ["hostile:big", "hostile:abig"])
def test_a_pipeline_paused_on_its_output_is_answered_whole_and_in_order(start, handler):
    """12 MB of replies to 3000 pipelined lines, sent before the client reads a byte and
    then half-closed: once it reads, every line is answered, in order, then the
    connection closes."""
    sv = start(handler)
    n = 3000
    with connect(sv.tcp("svc"), timeout=30) as s:
        def send() -> None:
            s.sendall(b"".join(b"line %d\n" % i for i in range(n)))
            s.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        sender.join(30)  # the server reads all of it (its paused parsing leaves it in our buffers)
        assert not sender.is_alive()
        data = recv_all(s)
    replies = data.split(b"\r\n")
    assert replies[-1] == b"" and len(replies) == n + 1, (len(replies), replies[-2][:40])
    for i, reply in enumerate(replies[:-1]):
        assert reply == b"line %d " % i + b"x" * 4000, (i, reply[:40])


def test_a_half_closed_client_that_reads_nothing_is_dropped_at_idle_timeout(start):
    """A client sends a line and its end of file and never reads the (large) reply: the
    close cannot finish; it is dropped once nothing has moved for idle_timeout, not held
    (with its slot and descriptor) for ever, and a graceful stop does not wait for it."""
    sv = start("hostile:Hoarder", idle_timeout=1)
    with connect(sv.tcp("svc"), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"give\n")
        s.shutdown(socket.SHUT_WR)
        wait_for(lambda: sv.status()["services"][0]["pool"]["connections"] == 0, timeout=15,
                 message="the connection gone")
    assert [ev["error"] for ev in sv.log.find("connection.idle_timeout")] == ["client stopped reading"]


@pytest.mark.parametrize("line", [b"close", b"keep"])
def test_a_slow_but_steady_reader_gets_a_reply_longer_than_idle_timeout_whole(start, line):
    """20 MB read at a few MB/s take several times idle_timeout (1 s): the client keeps
    reading, so it is not "stopped reading" (that was decided from when the output was
    first paused, not from progress); a final reply (``Close``) is not cut when the
    lingering close's 0.5 s run out (it was, at ~5.7 MB)."""
    sv = start("hostile:huge", idle_timeout=1)
    with connect(sv.tcp("svc"), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(line + b"\n")
        got = 0
        while got < 20_000_002:
            chunk = s.recv(262144)
            if not chunk:
                break
            got += len(chunk)
            time.sleep(0.02)  # pacing: a slow reader (~4 s for the lot), not synchronisation
    assert got >= 20_000_002  # "keep" may then get its idle timeout's error line
    assert not sv.log.find("connection.idle_timeout", error="client stopped reading")


def test_a_handler_sees_its_transport_s_ends_and_limits(start):
    """What a handler may ask of ``self.conn.transport`` (asyncio's lean transport and
    uvloop's alike): the peer's and our address, the write buffer limits (64 KiB high)."""
    sv = start("hostile:Where")
    host, port = sv.tcp("svc")
    with connect((host, port)) as s:
        s.sendall(b"where\n")
        assert recv_until(s) == b"%d %d 65536\r\n" % (s.getsockname()[1], port)
