"""Hostile clients of the master's own endpoints (metrics, agent-check, control socket)
and careless operators of the command line around them: what an nginx, HAProxy or
Prometheus operator takes for granted, checked against the real supervisor."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
from typing import List, Tuple

from conftest import recv_all, run_cli, wait_for

ENDPOINTS = '''
[supervisor]
pidfile = "run/preforkd.pid"
control_socket = "run/preforkd.sock"
graceful_timeout = 10
agent_check = "tcp://127.0.0.1:0"

[metrics]
listen = "tcp://127.0.0.1:0"

[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:0"]
workers = 1
'''


def role_addr(sv, role: str) -> Tuple[str, int]:
    ev = sv.wait_event("listener.bound", role=role)
    host, _, port = ev["address"][len("tcp://"):].rpartition(":")
    return host, int(port)


def test_answered_clients_that_stay_open_do_not_lock_out_a_scrape_or_the_agent(supervisor):
    """16 clients (every slot) that got their reply but never close must not hold the
    endpoint until their timeout (10 s for metrics: Prometheus' whole scrape_timeout;
    5 s for the agent): a new connection displaces the oldest of them."""
    sv = supervisor(ENDPOINTS)
    metrics, agent = role_addr(sv, "metrics"), role_addr(sv, "agent_check")
    held: List[socket.socket] = []
    try:
        for _ in range(16):
            s = socket.create_connection(metrics, timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(12) == b"HTTP/1.1 200"  # answered; never read further, never closed
            held.append(s)
        began = time.monotonic()
        conn = http.client.HTTPConnection(*metrics, timeout=20)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200 and b"preforkd_generation" in resp.read()
        conn.close()
        assert time.monotonic() - began < 3.0, "a scrape waited for answered clients to time out"

        for _ in range(16):
            s = socket.create_connection(agent, timeout=5)
            assert s.recv(100).startswith(b"up ready")  # read, never closed
            held.append(s)
        began = time.monotonic()
        with socket.create_connection(agent, timeout=10) as s:
            assert recv_all(s).startswith(b"up ready")
        assert time.monotonic() - began < 2.0, "the agent waited for answered clients to time out"
    finally:
        for s in held:
            s.close()


def test_a_reply_that_is_not_a_whole_status_document_never_gives_a_traceback(supervisor):
    """Something else answering at the control socket's path (another program's socket, a
    master of another version) with JSON that is not this version's status document:
    ``status``, ``top`` and ``reload`` say so in one line, never a traceback."""
    sv = supervisor(ENDPOINTS)
    sock = sv.config.parent / "run" / "preforkd.sock"
    real = sock.with_name("real.sock")
    os.rename(sock, real)
    fake = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fake.bind(str(sock))
    fake.listen(16)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = fake.accept()
            except OSError:
                return
            with conn:
                conn.recv(100)
                conn.sendall(b'{"pid": 1, "state": "running"}\n')

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        for args in (("status",), ("top", "--iterations", "1"), ("reload", "--timeout", "5")):
            res = run_cli(*args, "-c", str(sv.config))
            assert "Traceback" not in res.stderr, (args, res.stderr)
            assert res.returncode != 0 or "status" in args, (args, res)
            assert len(res.stderr.strip().splitlines()) <= 1, (args, res.stderr)
        res = run_cli("status", "-c", str(sv.config))
        assert f"pid {sv.pid}" in res.stdout and "not a status document" in res.stdout, res.stdout
    finally:
        stop.set()
        fake.close()
        os.unlink(sock)
        os.rename(real, sock)


PROXIED = '''
[log]
format = "json"
level = "info"
access = true

[[service]]
name = "one"
listen = ["tcp://127.0.0.1:0"]
workers = 1
proxy_protocol = true

[[service]]
name = "many"
listen = ["tcp://127.0.0.1:0"]
workers = 1
worker_connections = 4
proxy_protocol = true

[[service]]
name = "one_untrusted"
listen = ["tcp://127.0.0.1:0"]
workers = 1
proxy_protocol = true
proxy_trusted = ["192.0.2.0/24"]

[[service]]
name = "many_untrusted"
listen = ["tcp://127.0.0.1:0"]
workers = 1
worker_connections = 4
proxy_protocol = true
proxy_trusted = ["192.0.2.0/24"]
'''


def dropped(s: socket.socket) -> bool:
    """Closed by the other end without a reply (end of input, or a reset)."""
    try:
        return recv_all(s) == b""
    except ConnectionResetError:
        return True


def test_access_log_has_one_event_for_a_connection_the_proxy_gate_rejected(supervisor):
    """``[log] access``: every connection ends with one ``connection.closed``, those the
    PROXY protocol gate dropped included (reason ``proxy_rejected``, the real peer), in
    both worker kinds; before, the one-connection worker logged nothing for them and the
    event-driven one said ``client_closed``."""
    sv = supervisor(PROXIED)
    for name in ("one", "many"):
        addr = sv.tcp(name)
        with socket.create_connection(addr, timeout=10) as s:
            s.sendall(b"PROXY TCP4 999.0.0.1 192.0.2.1 1 2\r\nhello\n")
            port = s.getsockname()[1]
            assert dropped(s)
        with socket.create_connection(addr, timeout=10) as s:
            s.sendall(b"PROXY TCP4 203.0.113.9 192.0.2.1 4000 7000\r\nhello\n")
            assert s.recv(100) == b"hello\r\n"
        wait_for(lambda n=name: len(sv.log.find("connection.closed", service=n)) >= 2,
                 message=f"two connection.closed of {name}")
        events = sv.log.find("connection.closed", service=name)
        rejected = [e for e in events if e["reason"] == "proxy_rejected"]
        assert len(rejected) == 1 and rejected[0]["peer"] == f"127.0.0.1:{port}", events
        assert rejected[0]["lines"] == 0 and rejected[0]["bytes_out"] == 0, rejected
        assert [e["peer"] for e in events if e is not rejected[0]] == ["203.0.113.9:4000"], events
    for name in ("one_untrusted", "many_untrusted"):
        with socket.create_connection(sv.tcp(name), timeout=10) as s:
            s.sendall(b"PROXY TCP4 203.0.113.9 192.0.2.1 4000 7000\r\nhello\n")
            assert dropped(s)
        ev = sv.wait_event("connection.closed", service=name)
        assert ev["reason"] == "proxy_rejected" and ev["peer"].startswith("127.0.0.1:"), ev
    wait_for(lambda: len(sv.log.find("proxy.rejected")) == 4, message="four proxy.rejected")
    assert sum(len(sv.log.find("connection.closed", service=n)) for n in ("one", "many")) == 4


def test_reload_while_the_supervisor_drains_to_stop_fails_at_once(supervisor):
    """``preforkd reload`` during TERM's ``drain_delay`` (no reload is started while
    draining, docs/scale-out.md) says so at once instead of waiting out its timeout
    (60 s by default: a ``systemctl reload`` hanging for a minute)."""
    sv = supervisor(ENDPOINTS.replace("graceful_timeout = 10", "graceful_timeout = 10\ndrain_delay = 30"))
    sv.signal(signal.SIGTERM)
    sv.wait_event("supervisor.draining", reason="SIGTERM")
    began = time.monotonic()
    res = run_cli("reload", "--timeout", "20", "-c", str(sv.config))
    took = time.monotonic() - began
    assert res.returncode == 1 and "stopping" in res.stderr, res
    assert took < 10, f"reload waited {took:.1f} s"
    assert sv.status()["state"] == "draining"  # and the drain goes on
