"""Hostile clients of the master's own endpoints (metrics, agent-check, control socket)
and careless operators of the command line around them: what an nginx, HAProxy or
Prometheus operator takes for granted, checked against the real supervisor."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from typing import List, Tuple

from conftest import recv_all, run_cli

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
