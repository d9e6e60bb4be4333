"""The access log (issue 11): ``[log] access = true`` logs one ``connection.closed`` per
connection, with the right counts, in both worker kinds and for command services; off
by default, and then nothing is logged per connection."""

from __future__ import annotations

import socket

from conftest import connect, exchange, recv_all, run_cli, wait_for, write_config

SERVICES = '''
[[service]]
name = "one"
listen = ["tcp://127.0.0.1:0", "unix:run/one.sock"]
workers = 1
max_line_length = 16

[[service]]
name = "many"
listen = ["tcp://127.0.0.1:0"]
workers = 1
worker_connections = 8
max_line_length = 16

[[service]]
name = "daytime"
listen = ["tcp://127.0.0.1:0"]
handler = "preforkd.services:daytime"
workers = 1

[[service]]
name = "cat"
listen = ["tcp://127.0.0.1:0"]
command = ["cat"]
workers = 1
'''

ACCESS = '[log]\nformat = "json"\nlevel = "info"\naccess = true\n' + SERVICES


def served(sv, service: str) -> int:
    return next(s for s in sv.status()["services"] if s["name"] == service)["connections_total"]


def closed(sv, service: str):
    return sv.log.find("connection.closed", service=service)


def nth_closed(sv, service: str, n: int):
    """The *n*-th (from 1) ``connection.closed`` of *service*, once there are exactly *n*."""
    evs = closed(sv, service)
    return evs[n - 1] if len(evs) == n else None


def test_one_event_per_connection_with_the_right_counts(supervisor):
    sv = supervisor(ACCESS)
    for name in ("one", "many"):
        addr = sv.tcp(name)
        peers = []
        for _ in range(5):
            with connect(addr) as s:
                peers.append("{}:{}".format(*s.getsockname()[:2]))
                s.sendall(b"a\nbb\r\nccc\n")  # 3 lines, 10 bytes in
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s) == b"a\r\nbb\r\nccc\r\n"  # 12 bytes out
        wait_for(lambda name=name: nth_closed(sv, name, 5), message=f"5 connection.closed for {name}")
        evs = closed(sv, name)
        assert sorted(e["peer"] for e in evs) == sorted(peers)
        for e in evs:
            assert (e["lines"], e["bytes_in"], e["bytes_out"], e["reason"]) == (3, 10, 12, "client_closed"), e
            assert e["level"] == "info" and e["duration_ms"] >= 0

        # a protocol error: its reply counted, its reason given
        assert exchange(addr, b"x" * 40 + b"\n").startswith(b"ERROR line too long")
        ev = wait_for(lambda name=name: nth_closed(sv, name, 6))
        assert ev["reason"] == "line_too_long" and ev["lines"] == 0 and ev["bytes_in"] == 41, ev
        assert ev["bytes_out"] == len(b"ERROR line too long (max 16 bytes)\r\n"), ev
        assert served(sv, name) == 6

    # the server ends it (RFC 867 daytime: one line, then close)
    with connect(sv.tcp("daytime")) as s:
        line = recv_all(s)
    ev = wait_for(lambda: closed(sv, "daytime"))[0]
    assert (ev["reason"], ev["lines"], ev["bytes_in"], ev["bytes_out"]) == ("server_closed", 0, 0, len(line))

    # a Unix-domain client has no address
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sv.config.parent / "run" / "one.sock"))
        s.sendall(b"over unix\n")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"over unix\r\n"
    ev = wait_for(lambda: nth_closed(sv, "one", 7))
    assert (ev["peer"], ev["lines"], ev["bytes_in"], ev["bytes_out"]) == ("unix", 1, 10, 11)

    # a command service: the program owns the socket; the kernel counts its bytes
    with connect(sv.tcp("cat")) as s:
        s.sendall(b"hello cat\n")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"hello cat\n"
    ev = wait_for(lambda: closed(sv, "cat"))[0]
    assert (ev["reason"], ev["lines"], ev["bytes_in"], ev["bytes_out"]) == ("program_exited", None, 10, 10), ev
    assert len(closed(sv, "cat")) == 1 and len(closed(sv, "daytime")) == 1


def test_off_by_default_nothing_per_connection(supervisor):
    sv = supervisor(SERVICES)
    for name in ("one", "many"):
        for i in range(5):
            assert exchange(sv.tcp(name), b"hi %d\n" % i) == b"hi %d\r\n" % i
        wait_for(lambda name=name: served(sv, name) == 5, message=f"5 connections served by {name}")
    with connect(sv.tcp("cat")) as s:
        s.sendall(b"x\n")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"x\n"
    wait_for(lambda: served(sv, "cat") == 1)
    assert not sv.log.find("connection.closed")


def test_access_needs_info_level(tmp_path):
    cfg = write_config(tmp_path, '[log]\nlevel = "warning"\naccess = true\n' + SERVICES)
    res = run_cli("check", "-c", str(cfg))
    assert res.returncode == 1 and "log.access: connection.closed is an info event" in res.stderr, res.stderr
