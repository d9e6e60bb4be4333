"""Capacity: dynamic pools, event-driven workers, line_timeout, the descriptor limit.

The three ways a fixed pool of one-connection workers used to go down are each shown
not to here: more persistent clients than workers, silent connections, and clients
that trickle a line one byte at a time.
"""

from __future__ import annotations

import json
import resource
import signal
import socket
import threading
import time
from typing import List

import pytest

from conftest import Load, connect, exchange, recv_all, recv_until, run_cli, wait_for

DYNAMIC = '''
[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:0"]
workers = 2
max_workers = {max_workers}
min_spare_workers = 1
max_spare_workers = 2
'''

EVENT = '''
[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:0", "unix:run/echo.sock"]
workers = 2
worker_connections = {conns}
'''


def pool_of(sv, service="echo"):
    return next(s for s in sv.status()["services"] if s["name"] == service)["pool"]


def held(addr, n: int, greet: bool = True) -> List[socket.socket]:
    """*n* open connections, each answered once (so each holds a worker or a slot)."""
    socks = []
    for i in range(n):
        s = connect(addr, timeout=20)
        if greet:
            s.sendall(b"hold %d\n" % i)
            assert recv_until(s) == b"hold %d\r\n" % i
        socks.append(s)
    return socks


def close_all(socks) -> None:
    for s in socks:
        s.close()


# -- dynamic pools -------------------------------------------------------------------


def test_dynamic_pool_serves_more_persistent_clients_than_workers_then_shrinks(supervisor):
    """2 workers, up to 12: ten persistent clients are all answered (a fixed pool of 2
    would leave eight waiting), the pool grows to hold them with a spare, status shows
    busy/idle/current/max, and once they leave the surplus is retired gracefully after
    the grace period, down to the floor."""
    sv = supervisor(DYNAMIC.format(max_workers=12))
    addr = sv.tcp("echo")
    socks = held(addr, 10)
    try:
        for i, s in enumerate(socks):  # every one still answers
            s.sendall(b"again %d\n" % i)
            assert recv_until(s) == b"again %d\r\n" % i
        p = wait_for(lambda: (lambda p: p if p["busy"] == 10 and p["idle"] >= 1 else None)(pool_of(sv)),
                     message="10 busy workers and a spare")
        assert p["max"] == 12 and p["min"] == 2 and p["dynamic"] is True and p["current"] >= 11
        res = run_cli("status", "-c", str(sv.config))
        assert "busy" in res.stdout and "of 2..12" in res.stdout, res.stdout
    finally:
        close_all(socks)
    wait_for(lambda: pool_of(sv)["current"] == 2, timeout=60, message="the pool back at its floor")
    shrink = sv.log.find("pool.resized", workers=2)
    assert shrink and "idle for" in shrink[-1]["reason"]
    assert not sv.log.find("worker.exited", signal="SIGKILL")  # retired gracefully
    assert exchange(addr, b"still serving\n") == b"still serving\r\n"


def test_ceiling_holds_and_saturation_is_logged_once(supervisor):
    sv = supervisor(DYNAMIC.format(max_workers=3))
    addr = sv.tcp("echo")
    socks = held(addr, 3)
    waiting = [connect(addr, timeout=20) for _ in range(3)]
    try:
        for s in waiting:
            s.sendall(b"queued\n")
        sv.wait_event("pool.saturated")
        p = pool_of(sv)
        assert p["current"] == 3 and p["busy"] == 3 and p["max"] == 3 and p["saturated"] is True
        socks.pop(0).close()  # a worker frees up: the queued clients are served one after another
        first = waiting.pop(0)
        assert recv_until(first) == b"queued\r\n"
        first.close()
        second = waiting.pop(0)
        assert recv_until(second) == b"queued\r\n"
        second.close()
    finally:
        close_all(socks + waiting)
    assert len(sv.log.find("pool.saturated")) == 1
    ev = sv.log.find("pool.saturated")[0]
    assert ev["service"] == "echo" and ev["max_workers"] == 3


def test_ttin_ttou_move_a_dynamic_pools_floor(supervisor):
    sv = supervisor(DYNAMIC.format(max_workers=6))
    sv.signal(signal.SIGTTIN)
    wait_for(lambda: pool_of(sv)["min"] == 3 and pool_of(sv)["current"] == 3, message="floor 3")
    sv.signal(signal.SIGTTOU)
    wait_for(lambda: pool_of(sv)["min"] == 2 and pool_of(sv)["current"] == 2, message="floor back to 2")
    assert pool_of(sv)["max"] == 6


# -- event-driven workers --------------------------------------------------------------


def test_hundreds_of_concurrent_clients_on_two_event_workers(supervisor):
    sv = supervisor(EVENT.format(conns=400))
    addr = sv.tcp("echo")
    socks = [connect(addr, timeout=20) for _ in range(300)]
    try:
        for rnd in range(3):
            for i, s in enumerate(socks):  # every client talks while all 300 are open
                s.sendall(b"round %d client %d\n" % (rnd, i))
            for i, s in enumerate(socks):
                assert recv_until(s) == b"round %d client %d\r\n" % (rnd, i)
        p = pool_of(sv)
        assert p["connections"] == 300 and p["current"] == 2
        per_worker = [w["active"] for w in next(s for s in sv.status()["services"])["workers"]]
        assert sum(per_worker) == 300
    finally:
        close_all(socks)
    wait_for(lambda: pool_of(sv)["connections"] == 0, message="all connections closed")


def test_async_handler_serves_fifty_clients_concurrently(supervisor, tmp_path):
    """An ``async def`` handler that sleeps 1 s serves 50 clients in about a second, not
    50: awaiting does not hold up the worker's other connections."""
    (tmp_path / "sleepy.py").write_text(
        "import asyncio\n"
        "async def handle(line):\n"
        "    await asyncio.sleep(1)\n"
        "    return 'slept ' + line\n")
    sv = supervisor('''
        [supervisor]
        pidfile = "run/p.pid"
        control_socket = "run/p.sock"
        python_path = ["."]
        [[service]]
        name = "sleepy"
        listen = ["tcp://127.0.0.1:0"]
        handler = "sleepy:handle"
        workers = 1
        worker_connections = 100
    ''')
    addr = sv.tcp("sleepy")
    socks = [connect(addr, timeout=60) for _ in range(50)]
    t0 = time.monotonic()
    try:
        for i, s in enumerate(socks):
            s.sendall(b"c%d\n" % i)
        for i, s in enumerate(socks):
            assert recv_until(s) == b"slept c%d\r\n" % i
    finally:
        close_all(socks)
    elapsed = time.monotonic() - t0
    assert elapsed < 25, f"50 one-second calls took {elapsed:.1f} s: they did not overlap"


def test_async_line_handler_class_keeps_order_per_connection(supervisor, tmp_path):
    (tmp_path / "greeter.py").write_text(
        "import asyncio, random\n"
        "import preforkd\n"
        "class Greeter(preforkd.LineHandler):\n"
        "    async def on_connect(self):\n"
        "        await asyncio.sleep(0.01)\n"
        "        return 'hello ' + self.conn.service\n"
        "    async def on_line(self, line):\n"
        "        if line == 'quit':\n"
        "            return preforkd.Close('bye')\n"
        "        await asyncio.sleep(random.random() / 100)\n"
        "        return line.upper()\n")
    sv = supervisor('''
        [supervisor]
        pidfile = "run/p.pid"
        control_socket = "run/p.sock"
        python_path = ["."]
        [[service]]
        name = "greet"
        listen = ["tcp://127.0.0.1:0"]
        handler = "greeter:Greeter"
        workers = 1
        worker_connections = 10
    ''')
    with connect(sv.tcp("greet")) as s:
        s.sendall(b"".join(b"line %d\n" % i for i in range(20)) + b"quit\nignored\n")
        assert recv_all(s) == b"hello greet\r\n" + b"".join(b"LINE %d\r\n" % i for i in range(20)) + b"bye\r\n"


@pytest.mark.parametrize("kind", ["sync", "event"])
def test_trickling_client_is_cut_at_line_timeout(supervisor, kind):
    """One byte every 0.2 s, never a newline: each read resets idle_timeout (30 s), but
    line_timeout (1 s from the line's first byte) ends it, in both worker kinds."""
    body = DYNAMIC.format(max_workers=2).replace("max_spare_workers = 2", "idle_timeout = 30\nline_timeout = 1")
    if kind == "event":
        body += "worker_connections = 10\n"
    sv = supervisor(body)
    stop = threading.Event()
    with connect(sv.tcp("echo"), timeout=20) as s:
        def trickle() -> None:
            try:
                while not stop.wait(0.2):  # pacing, not synchronisation
                    s.sendall(b"x")
            except OSError:
                pass
        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        try:
            assert recv_all(s) == b"ERROR line timeout\r\n"
        finally:
            stop.set()
            t.join(10)
    ev = sv.wait_event("connection.line_timeout")
    assert ev["error"] == "no whole line within 1 s" and "peer" in ev


def test_silent_connections_do_not_stop_a_fresh_client_in_event_mode(supervisor):
    """40 connections that never say anything on a pool of 2 event-driven workers: a
    fresh client is still answered at once (two one-connection workers would be held
    for idle_timeout)."""
    sv = supervisor(EVENT.format(conns=100))
    addr = sv.tcp("echo")
    silent = held(addr, 40, greet=False)
    try:
        wait_for(lambda: pool_of(sv)["connections"] == 40, message="40 silent connections accepted")
        for i in range(5):
            assert exchange(addr, b"fresh %d\n" % i) == b"fresh %d\r\n" % i
    finally:
        close_all(silent)


def test_event_worker_at_its_limit_stops_accepting_until_one_closes(supervisor):
    sv = supervisor(EVENT.format(conns=2).replace("workers = 2", "workers = 1"))
    addr = sv.tcp("echo")
    first, second = held(addr, 2)
    third = connect(addr, timeout=20)
    try:
        third.sendall(b"third\n")
        w = wait_for(lambda: (lambda w: w if w["state"] == "busy" else None)(
            next(s for s in sv.status()["services"])["workers"][0]), message="the worker full")
        assert w["active"] == 2
        first.close()
        assert recv_until(third) == b"third\r\n"  # taken as soon as a slot is free
    finally:
        close_all([first, second, third])


def test_event_worker_graceful_stop_finishes_what_it_holds(supervisor):
    sv = supervisor(EVENT.format(conns=10))
    addr = sv.tcp("echo")
    socks = held(addr, 3)
    sv.signal(signal.SIGTERM)
    sv.wait_event("supervisor.stopping")
    for i, s in enumerate(socks):  # still served after TERM
        s.sendall(b"after term %d\n" % i)
        assert recv_until(s) == b"after term %d\r\n" % i
    wait_for(lambda: refused(addr), message="new clients refused")
    assert sv.proc.poll() is None
    close_all(socks)
    assert sv.wait_exit() == 0
    assert not sv.log.find("worker.exited", signal="SIGALRM")


def refused(addr) -> bool:
    try:
        socket.create_connection(addr, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_event_worker_max_requests_recycles_it(supervisor):
    sv = supervisor(EVENT.format(conns=10).replace("workers = 2", "workers = 1") + "max_requests = 5\n")
    addr = sv.tcp("echo")
    first = sv.worker_pids()
    for i in range(5):
        assert exchange(addr, b"n%d\n" % i) == b"n%d\r\n" % i
    sv.wait_event("worker.max_requests")
    wait_for(lambda: sv.worker_pids() and sv.worker_pids() != first, message="a fresh worker")
    assert exchange(addr, b"fresh\n") == b"fresh\r\n"


def test_event_worker_over_unix_socket(supervisor, tmp_path):
    supervisor(EVENT.format(conns=10))
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(tmp_path / "run" / "echo.sock"))
        s.sendall(b"over unix\r\n")
        assert recv_until(s) == b"over unix\r\n"


# -- reloads keep working ------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    DYNAMIC.format(max_workers=16),
    EVENT.format(conns=50),
    EVENT.format(conns=50) + "max_workers = 6\n",
], ids=["dynamic", "event", "event+dynamic"])
def test_reloads_under_load_lose_no_connection(supervisor, body):
    sv = supervisor(body)
    addr = sv.tcp("echo")
    with Load(addr, short=3, long=3) as load:
        wait_for(lambda: load.counts["long_ok"] >= 3 and load.counts["short_ok"] >= 30, message="load running")
        for i in range(5):
            res = run_cli("reload", "-c", str(sv.config), "--timeout", "60", timeout=90)
            assert res.returncode == 0, res.stderr + res.stdout
            assert f"generation {i + 2} serving" in res.stdout
        seen = load.counts["short_ok"]
        wait_for(lambda: load.counts["short_ok"] >= seen + 30, message="load after the reloads")
    assert load.bad() == {}, load.failures
    assert sv.proc.poll() is None


# -- limits --------------------------------------------------------------------------------------


def test_master_raises_its_descriptor_limit_and_says_so(supervisor):
    sv = supervisor(EVENT.format(conns=10))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ev = sv.wait_event("supervisor.limits")
    assert ev["nofile"] == hard and ev["previous"] == soft
    worker = sv.worker_pids()[0]
    with open(f"/proc/{worker}/limits") as f:
        line = next(ln for ln in f if ln.startswith("Max open files"))
    assert int(line.split()[3]) == hard


def test_status_json_has_pool_counts_for_a_fixed_pool(supervisor):
    sv = supervisor(EVENT.format(conns=1))  # worker_connections = 1: one-connection workers
    res = run_cli("status", "--json", "-c", str(sv.config))
    p = json.loads(res.stdout)["services"][0]["pool"]
    assert p == {**p, "current": 2, "min": 2, "max": 2, "dynamic": False, "worker_connections": 1, "busy": 0}


def test_the_async_examples_work(supervisor):
    """examples/async.toml's services, as docs/handlers.md shows them."""
    from conftest import ROOT

    sv = supervisor(f'''
        [supervisor]
        pidfile = "run/p.pid"
        control_socket = "run/p.sock"
        python_path = ["{ROOT / "examples"}"]
        [[service]]
        name = "delayed"
        listen = ["tcp://127.0.0.1:0"]
        handler = "async_handlers:delayed"
        workers = 1
        worker_connections = 100
        [[service]]
        name = "chat"
        listen = ["tcp://127.0.0.1:0"]
        handler = "async_handlers:Chat"
        workers = 1
        worker_connections = 100
    ''')
    with connect(sv.tcp("delayed")) as s:
        s.sendall(b"WAIT 0.2 later\r\nnow\r\nQUIT\r\n")
        assert recv_all(s) == b"later\r\nnow\r\n+BYE\r\n"
    a = connect(sv.tcp("chat"))
    assert recv_until(a).startswith(b"+OK 1 here")
    b = connect(sv.tcp("chat"))
    try:
        assert recv_until(b).startswith(b"+OK 2 here")
        assert recv_until(a).endswith(b"joined\r\n")
        b.sendall(b"hi all\r\n")
        assert recv_until(a).endswith(b": hi all\r\n")
    finally:
        close_all([a, b])
