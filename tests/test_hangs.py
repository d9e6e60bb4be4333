"""Hangs and leaks: stuck workers killed with their stack, memory recycling, and a
reload that cannot wedge (issue "Hangs, leaks and hostile neighbours")."""

from __future__ import annotations

import os
import signal
import textwrap

import pytest

from conftest import connect, exchange, recv_all, recv_until, run_cli, wait_for, write_config

HANDLERS = '''
import time

def handle(line):
    if line == "spin":
        while True:  # a handler that never returns
            pass
    if line == "sleep":
        time.sleep(10**6)
    return line

hog = []

def grow(line):
    hog.append(bytearray(8 * 1024 * 1024))  # 8 MiB more per line, never freed
    return f"{len(hog) * 8} MiB"
'''


def service(handler: str, extra: str = "", name: str = "svc") -> str:
    return textwrap.dedent(f'''
        [[service]]
        name = "{name}"
        listen = ["tcp://127.0.0.1:0"]
        handler = "{handler}"
        workers = 1
    ''') + textwrap.dedent(extra)


@pytest.fixture
def start(supervisor, tmp_path):
    (tmp_path / "stuck.py").write_text(HANDLERS)

    def go(body: str, **kw):
        return supervisor('[supervisor]\npidfile = "run/p.pid"\ncontrol_socket = "run/p.sock"\n'
                          'graceful_timeout = 10\npython_path = ["."]\n' + body, **kw)
    return go


@pytest.mark.parametrize("line, where", [("spin", "while True"), ("sleep", "time.sleep")])
def test_a_stuck_handler_is_killed_with_its_stack_and_replaced(start, line, where):
    sv = start(service("stuck:handle", "timeout = 1\n"))
    addr = sv.tcp("svc")
    first = sv.worker_pids()
    with connect(addr, timeout=30) as s:
        s.sendall(line.encode() + b"\n")
        ev = sv.wait_event("worker.timeout")
        assert recv_all(s) == b""  # the worker is gone; so is its connection
    assert ev["child"] == first[0] and ev["timeout"] == 1 and ev["reason"].startswith("in handler code")
    assert "stuck.py" in ev["stack"] and "in handle" in ev["stack"], ev["stack"]
    wait_for(lambda: sv.worker_pids() and sv.worker_pids() != first, message="a replacement")
    assert exchange(addr, b"alive\n") == b"alive\r\n"
    assert not sv.log.find("worker.backoff")  # a timeout is not a crash loop


def test_status_shows_how_long_a_busy_worker_has_been_in_its_call(start):
    sv = start(service("stuck:handle", "timeout = 30\n"))
    with connect(sv.tcp("svc"), timeout=30) as s:
        s.sendall(b"sleep\n")
        w = wait_for(lambda: (lambda w: w if (w["in_call"] or 0) > 0.2 else None)(
            sv.status()["services"][0]["workers"][0]), message="a worker in its call")
        assert w["state"] == "busy"
        assert "in handler for" in run_cli("status", "-c", str(sv.config)).stdout


def test_a_worker_waiting_on_a_silent_client_is_never_killed(start):
    """timeout bounds handler code, not waiting on the client: a silent connection
    outlives several timeouts and ends by idle_timeout, the worker untouched."""
    sv = start(service("stuck:handle", "timeout = 1\nidle_timeout = 4\n"))
    pid = sv.worker_pids()[0]
    with connect(sv.tcp("svc"), timeout=30) as s:
        s.sendall(b"hello\n")
        assert recv_until(s) == b"hello\r\n"
        assert recv_all(s) == b"ERROR idle timeout\r\n"  # 4 s of silence: 4 timeouts long
    assert not sv.log.find("worker.timeout")
    assert sv.worker_pids() == [pid]


def test_a_stopped_worker_is_killed_and_replaced(start):
    sv = start(service("stuck:handle", "timeout = 1\n"))
    pid = sv.worker_pids()[0]
    os.kill(pid, signal.SIGSTOP)
    ev = sv.wait_event("worker.timeout", child=pid)
    assert ev["reason"] == "stopped (SIGSTOP)" and ev["stack"] is None
    wait_for(lambda: sv.worker_pids() and sv.worker_pids() != [pid], message="a replacement")
    assert exchange(sv.tcp("svc"), b"ok\n") == b"ok\r\n"


def test_an_event_loop_blocked_by_a_handler_is_killed_with_its_stack(start):
    sv = start(service("stuck:handle", "timeout = 1\nworker_connections = 10\n"))
    addr = sv.tcp("svc")
    pid = sv.worker_pids()[0]
    with connect(addr, timeout=30) as s:
        s.sendall(b"sleep\n")
        ev = sv.wait_event("worker.timeout", child=pid)
    assert ev["reason"].startswith("its event loop has not turned")
    assert "time.sleep" in ev["stack"] or "in handle" in ev["stack"], ev["stack"]
    wait_for(lambda: sv.worker_pids() and sv.worker_pids() != [pid], message="a replacement")
    assert exchange(addr, b"fine\n") == b"fine\r\n"


def test_timeout_zero_is_off(start):
    sv = start(service("stuck:handle", "timeout = 0\nidle_timeout = 2\n"))
    with connect(sv.tcp("svc"), timeout=30) as s:
        s.sendall(b"hi\n")
        assert recv_all(s) == b"hi\r\nERROR idle timeout\r\n"
    assert not sv.log.find("worker.timeout")


def test_max_rss_recycles_a_growing_worker_after_the_connection_in_hand(start):
    sv = start(service("stuck:grow", "max_rss = 100\n"))
    addr = sv.tcp("svc")
    first = sv.worker_pids()
    with connect(addr, timeout=30) as s:
        for i in range(1, 30):
            s.sendall(b"more\n")
            assert recv_until(s) == f"{i * 8} MiB\r\n".encode()
            if sv.log.find("worker.recycled"):
                break
        ev = sv.wait_event("worker.recycled", reason="max_rss")
        assert ev["child"] == first[0] and ev["rss_mib"] > 100 and ev["max_rss"] == 100
        s.sendall(b"more\n")  # the connection in hand is still served
        assert recv_until(s).endswith(b" MiB\r\n")
    wait_for(lambda: sv.worker_pids() and sv.worker_pids() != first, message="a fresh worker")
    assert exchange(addr, b"x\n") == b"8 MiB\r\n"


def test_max_requests_recycling_logs_worker_recycled(start):
    sv = start(service("stuck:handle", "max_requests = 2\n"))
    for i in range(2):
        assert exchange(sv.tcp("svc"), b"r%d\n" % i) == b"r%d\r\n" % i
    ev = sv.wait_event("worker.recycled")
    assert ev["reason"] == "max_requests" and ev["served"] == 2


# -- a reload that cannot wedge -------------------------------------------------------

GOOD = '''
import preforkd
class H(preforkd.LineHandler):
    def on_line(self, line):
        return "v1 " + line
'''

INIT_RAISES = '''
import preforkd
class H(preforkd.LineHandler):
    @classmethod
    def worker_init(cls):
        raise ConnectionRefusedError("database is down")
    def on_line(self, line):
        return "v2 " + line
'''

# worker_init passes in the reload's check but fails in real workers (as one that needs
# the worker's user, or a resource only workers get, would).
INIT_RAISES_IN_WORKERS_ONLY = '''
import preforkd
import setproctitle
class H(preforkd.LineHandler):
    @classmethod
    def worker_init(cls):
        if setproctitle.getproctitle().startswith("preforkd: worker"):
            raise RuntimeError("cannot start in a worker")
    def on_line(self, line):
        return "v2 " + line
'''

FIXED = GOOD.replace("v1 ", "v3 ")


@pytest.mark.parametrize("broken, why", [
    (INIT_RAISES, "worker_init failed: ConnectionRefusedError: database is down"),
    (INIT_RAISES_IN_WORKERS_ONLY, "workers of app exit at start-up (worker_init failed)"),
], ids=["refused-by-the-check", "failing-after-exec"])
def test_a_reload_whose_workers_cannot_start_fails_then_the_next_one_succeeds(supervisor, tmp_path, broken, why):
    (tmp_path / "app.py").write_text(GOOD)
    body = ('[supervisor]\npidfile = "run/p.pid"\ncontrol_socket = "run/p.sock"\ngraceful_timeout = 10\n'
            'python_path = ["."]\n' + service("app:H", "workers = 2\n", name="app").replace("workers = 1\n", ""))
    sv = supervisor(body)
    addr = sv.tcp("app")
    old = sorted(sv.worker_pids())
    (tmp_path / "app.py").write_text(broken)
    res = run_cli("reload", "-c", str(sv.config), "--timeout", "60", timeout=90)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "reload failed" in res.stderr and why in res.stderr, res.stderr
    st = sv.status()
    assert st["state"] == "running" and st["reload"]["state"] == "failed"
    assert exchange(addr, b"still\n") == b"v1 still\r\n"  # the old generation serves
    assert set(old) <= {w["pid"] for w in st["services"][0]["workers"]}
    assert sv.log.find("config.reload_failed")
    # the code is fixed: the next reload goes through, the old workers are retired
    (tmp_path / "app.py").write_text(FIXED)
    res = run_cli("reload", "-c", str(sv.config), "--timeout", "60", timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr
    wait_for(lambda: exchange(addr, b"new\n") == b"v3 new\r\n", message="the fixed code serving")
    wait_for(lambda: not set(old) & set(sv.worker_pids()), message="old workers retired")
    assert sv.proc.poll() is None and sv.status()["pid"] == sv.pid


def test_the_reload_check_runs_worker_init_with_the_workers_privileges(tmp_path):
    """`preforkd check` run by a reloading master (the probe) runs worker_init; plain
    `check` does not (it has no side effects an operator would not expect)."""
    (tmp_path / "app.py").write_text(INIT_RAISES)
    cfg = write_config(tmp_path, '[supervisor]\npython_path = ["."]\n' + service("app:H"))
    assert run_cli("check", "-c", str(cfg)).returncode == 0
    env = dict(os.environ, PREFORKD_HANDOVER_PROBE="1")
    res = run_cli("check", "-c", str(cfg), env=env)
    assert res.returncode == 1
    assert "service[0].handler: worker_init failed: ConnectionRefusedError: database is down" in res.stderr
