"""Zero-downtime reload (issue 3): SIGHUP re-execs the master in place.

Every test runs the real supervisor and real clients. What is checked, besides
the behaviour of each reload: the master's PID never changes, and no client sees a
refused, reset, truncated or wrong reply.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil
import pytest

from conftest import Load, connect, exchange, recv_until, run_cli, wait_for, write_config

ECHO = '''
    [[service]]
    name = "echo"
    listen = ["tcp://127.0.0.1:0"]
    workers = {workers}
'''


def rewrite(sv, body: str) -> Path:
    """Replace the running supervisor's configuration file (same run/ paths)."""
    return write_config(sv.config.parent, body, sv.config.name)


def reload_cli(sv, timeout: float = 60) -> subprocess.CompletedProcess:
    """``preforkd reload``: SIGHUP, then wait for the reload's outcome."""
    return run_cli("reload", "-c", str(sv.config), "--timeout", str(timeout), timeout=timeout + 30)


def hup_and_wait(sv, count: int) -> dict:
    """SIGHUP and wait for the *count*-th ``config.reloaded`` event."""
    sv.signal(signal.SIGHUP)
    return sv.wait_event("config.reloaded", count=count)


def settled(sv, targets: Dict[str, int]) -> Optional[dict]:
    """The status document once the supervisor is idle after its reloads: running,
    last reload done, no retiring worker, and per service exactly *targets* workers,
    all ready and of the newest generation. ``None`` until then."""
    st = sv.status()
    if st["state"] != "running" or st["reload"]["state"] == "in_progress" or st["retiring_workers"]:
        return None
    if sorted(s["name"] for s in st["services"]) != sorted(targets):
        return None
    for svc in st["services"]:
        ws = svc["workers"]
        if len(ws) != targets[svc["name"]] or svc["workers_target"] != targets[svc["name"]]:
            return None
        if any(w["generation"] != st["generation"] or w["state"] not in ("idle", "busy") for w in ws):
            return None
    return st


def master_children(sv) -> List[int]:
    try:
        return sorted(p.pid for p in psutil.Process(sv.pid).children())
    except psutil.NoSuchProcess:
        return []


def echo_ok(addr, text: str = "ping") -> bool:
    return exchange(addr, text.encode() + b"\r\n") == text.encode() + b"\r\n"


def refused(addr) -> bool:
    try:
        with socket.create_connection(addr, timeout=2) as s:
            s.sendall(b"x\r\n")
            s.recv(100)
            return False  # still accepted somewhere (a retiring worker holds the socket)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


# -- the load test ----------------------------------------------------------------


def test_twenty_reloads_under_load(supervisor):
    """20 reloads in a row under continuous short and long-lived client load: no
    refused, reset or wrong reply; every long connection open at a HUP completes."""
    sv = supervisor(ECHO.format(workers=8))  # 3 long-lived clients hold 3 workers each generation
    addr = sv.tcp("echo")
    pid = sv.pid
    hups: List[float] = []
    walls: List[float] = []
    with Load(addr, short=3, long=3) as load:
        wait_for(lambda: load.counts["long_ok"] >= 3 and load.counts["short_ok"] >= 50, message="load running")
        for i in range(20):
            t0 = time.monotonic()
            hups.append(t0)
            res = reload_cli(sv)
            walls.append(time.monotonic() - t0)
            assert res.returncode == 0, f"reload {i + 1}: {res.stderr}{res.stdout}"
            assert f"generation {i + 2} serving (pid {pid})" in res.stdout
        # Let the connections that were open at the last HUP run out.
        wait_for(lambda: load.all_long_started_after(hups[-1]), message="long connections after the last HUP")
    st = sv.status()
    events = sv.log.find("config.reloaded")
    durations = [e["duration_ms"] for e in events]
    spanning = [(s, e, ok) for s, e, ok in load.spans if any(s < h < e for h in hups)]
    print(f"\n20 reloads under load: {load.counts['short_ok']} short connections ok, "
          f"{load.counts['long_ok']} long connections ok ({load.counts['long_lines']} lines, "
          f"{len(spanning)} open across a HUP), failures {load.bad() or 'none'}; "
          f"HUP->new generation accepting (duration_ms) max {max(durations):.1f} "
          f"median {sorted(durations)[len(durations) // 2]:.1f}; "
          f"`preforkd reload` wall time max {max(walls) * 1000:.0f} ms")
    assert load.bad() == {}, load.failures
    assert load.counts["short_ok"] > 100
    assert spanning and all(ok for _, _, ok in spanning)
    assert len(events) == 20 and [e["generation"] for e in events] == list(range(2, 22))
    assert {e["pid"] for e in events} == {pid}
    assert st["pid"] == pid and st["generation"] == 21 and st["reload"] == {"seq": 20, "state": "ok", "error": None}
    assert not sv.log.find("config.reload_failed")
    assert sv.proc.poll() is None


def test_a_lone_client_is_never_stranded(supervisor):
    """One client, one connection at a time, nobody else: a connection that arrives
    just as the old workers are told to stop must still be served at once. (With
    EPOLLEXCLUSIVE only one worker is woken per connection; if that worker is a
    retiring one and does not take it, it waits for the next client or reload.)"""
    sv = supervisor(ECHO.format(workers=8))
    addr = sv.tcp("echo")
    done, failures, stop = [0], [], threading.Event()

    def client() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                with connect(addr, timeout=5) as s:
                    s.sendall(b"lone\r\n")
                    assert recv_until(s) == b"lone\r\n"
            except (OSError, AssertionError) as exc:
                failures.append(f"after {time.monotonic() - t0:.2f} s: {exc!r}")
                return
            done[0] += 1

    t = threading.Thread(target=client, daemon=True)
    t.start()
    try:
        for n in range(1, 9):
            hup_and_wait(sv, n)
            mark = done[0]
            # The next reload would unstick a stranded connection: wait for it here.
            wait_for(lambda mark=mark: failures or done[0] >= mark + 300, timeout=20,
                     message="connections after the reload")
            assert not failures, f"reload {n}: {failures}"
    finally:
        stop.set()
        t.join(10)
    assert not failures


# -- what a reload changes ----------------------------------------------------------


def test_reload_adds_a_listener(supervisor, tmp_path):
    sv = supervisor(ECHO.format(workers=2))
    first = sv.tcp("echo")
    rewrite(sv, '''
        [[service]]
        name = "echo"
        listen = ["tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "unix:run/extra.sock"]
        workers = 2
    ''')
    res = reload_cli(sv)
    assert res.returncode == 0, res.stderr
    bound = [e for e in sv.log.find("listener.bound") if e["generation"] == 2]
    assert [e["origin"] for e in bound] == ["inherited"] * 3  # new ones are pre-bound by the old image
    tcp = [e["address"] for e in bound if e["address"].startswith("tcp://")]
    assert tcp[0] == f"tcp://{first[0]}:{first[1]}"  # the port-0 listener kept its port
    second = ("127.0.0.1", int(tcp[1].rsplit(":", 1)[1]))
    assert second != first
    assert echo_ok(first) and echo_ok(second, "second")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(tmp_path / "run" / "extra.sock"))
        s.sendall(b"unix\n")
        assert recv_until(s) == b"unix\r\n"
    st = sv.status()
    assert len(st["services"][0]["listeners"]) == 3 and st["pid"] == sv.pid


def test_reload_removes_listeners(supervisor, tmp_path):
    sv = supervisor('''
        [[service]]
        name = "echo"
        listen = ["tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "unix:run/gone.sock"]
        workers = 2
    ''')
    tcps = [a for a in sv.addresses("echo") if a.startswith("tcp://")]
    keep, drop = [("127.0.0.1", int(a.rsplit(":", 1)[1])) for a in tcps]
    sock_file = tmp_path / "run" / "gone.sock"
    assert sock_file.exists() and echo_ok(drop)
    rewrite(sv, ECHO.format(workers=2))
    assert reload_cli(sv).returncode == 0
    closed = sv.log.find("listener.closed")
    assert sorted(e["address"] for e in closed) == sorted(["tcp://127.0.0.1:0", f"unix:{sock_file}"])
    assert not sock_file.exists()
    assert echo_ok(keep)
    wait_for(lambda: settled(sv, {"echo": 2}), message="old workers gone")
    wait_for(lambda: refused(drop), timeout=10, message=f"{drop} refusing")
    assert [lst["address"] for lst in sv.status()["services"][0]["listeners"]] == [f"tcp://127.0.0.1:{keep[1]}"]


def test_reload_changes_worker_count(supervisor):
    sv = supervisor(ECHO.format(workers=2))
    gen1 = set(sv.worker_pids("echo"))
    for gen, n in ((2, 4), (3, 1)):
        rewrite(sv, ECHO.format(workers=n))
        assert reload_cli(sv).returncode == 0
        st = wait_for(lambda n=n: settled(sv, {"echo": n}), message=f"{n} workers of generation {gen}")
        assert st["generation"] == gen and st["pid"] == sv.pid
        pids = {w["pid"] for w in st["services"][0]["workers"]}
        assert not pids & gen1 and master_children(sv) == sorted(pids)
        assert echo_ok(sv.tcp("echo"))


def test_invalid_config_keeps_the_old_one(supervisor):
    sv = supervisor(ECHO.format(workers=2))
    addr = sv.tcp("echo")
    before = set(sv.worker_pids())
    rewrite(sv, ECHO.format(workers='"four"'))
    # The master's own check (a plain HUP, as `kill -HUP` sends it) ...
    sv.signal(signal.SIGHUP)
    ev = sv.wait_event("config.reload_failed")
    assert 'service[0].workers: must be an integer >= 1, got "four"' in ev["error"]
    st = sv.status()  # `status` still works although the file is broken
    assert st["generation"] == 1 and st["state"] == "running" and st["pid"] == sv.pid
    assert st["reload"]["state"] == "failed" and "service[0].workers" in st["reload"]["error"]
    assert set(sv.worker_pids()) == before and echo_ok(addr)
    # ... and `preforkd reload`, which says why and exits 1.
    res = reload_cli(sv)
    assert res.returncode == 1
    assert 'service[0].workers: must be an integer >= 1, got "four"' in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert echo_ok(addr) and sv.status()["generation"] == 1
    assert not sv.log.find("config.reexec")
    # Fixed: the next reload works.
    rewrite(sv, ECHO.format(workers=2))
    assert reload_cli(sv).returncode == 0
    assert sv.status()["generation"] == 2 and echo_ok(addr)


def test_an_edit_during_the_reload_cannot_kill_the_new_image(supervisor):
    """The new image runs the configuration text the old one validated: a file broken
    after the check (here: as soon as the exec is under way) is left for the next reload."""
    sv = supervisor(ECHO.format(workers=2))
    addr = sv.tcp("echo")
    rewrite(sv, ECHO.format(workers=3))
    sv.signal(signal.SIGHUP)
    sv.wait_event("config.reexec")
    rewrite(sv, ECHO.format(workers='"three"'))  # the new interpreter is still starting
    sv.wait_event("config.reloaded")
    st = wait_for(lambda: settled(sv, {"echo": 3}), message="3 workers of generation 2")
    assert st["generation"] == 2 and st["pid"] == sv.pid and echo_ok(addr)
    sv.signal(signal.SIGHUP)  # the broken file is the next reload's business: refused
    assert "service[0].workers" in sv.wait_event("config.reload_failed")["error"]
    assert sv.proc.poll() is None and echo_ok(addr)


def test_reload_failing_in_the_master_is_reported_by_reload(supervisor):
    """A reload that only the running master can find wrong (a new port that is
    taken): `preforkd reload` reports the master's reason and exits 1."""
    sv = supervisor(ECHO.format(workers=1))
    addr = sv.tcp("echo")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        rewrite(sv, f'''
            [[service]]
            name = "echo"
            listen = ["tcp://127.0.0.1:0", "tcp://127.0.0.1:{port}"]
            workers = 1
        ''')
        res = reload_cli(sv)
    assert res.returncode == 1
    assert "reload failed, still serving generation 1" in res.stderr and f"127.0.0.1:{port}" in res.stderr
    st = sv.status()
    assert st["generation"] == 1 and st["reload"]["state"] == "failed" and echo_ok(addr)


# -- new code -----------------------------------------------------------------------

HANDLER_CONFIG = '''
    [supervisor]
    pidfile = "run/preforkd.pid"
    control_socket = "run/preforkd.sock"
    graceful_timeout = 10
    python_path = ["."]

    [[service]]
    name = "app"
    listen = ["tcp://127.0.0.1:0"]
    handler = "mymod:handle"
    workers = 3
'''


def write_handler(directory: Path, body: str) -> None:
    path = directory / "mymod.py"
    old = path.stat().st_mtime if path.exists() else 0
    path.write_text(body)
    if old:
        # A .pyc is trusted while the source's size and mtime (whole seconds) match: an
        # edit of the same size within the same second would go unseen by any Python.
        os.utime(path, (old + 2, old + 2))


def test_new_code_takes_effect_without_a_failed_connection(supervisor, tmp_path):
    write_handler(tmp_path, 'def handle(line):\n    return "v1 " + line\n')
    sv = supervisor(HANDLER_CONFIG)
    addr = sv.tcp("app")
    assert exchange(addr, b"a\r\n") == b"v1 a\r\n"
    with Load(addr, short=2, long=1, expect=lambda line: ["v1 " + line, "v2: " + line.upper()]) as load:
        wait_for(lambda: load.counts["short_ok"] >= 20, message="load running")
        write_handler(tmp_path, 'def handle(line):\n    return "v2: " + line.upper()\n')
        hup_and_wait(sv, 1)
        # The old workers were told to stop before the event: a new connection gets new code.
        assert exchange(addr, b"b\r\n") == b"v2: B\r\n"
        seen = load.counts["short_ok"]
        wait_for(lambda: load.counts["short_ok"] >= seen + 20, message="load after the reload")
    assert load.bad() == {}, load.failures
    assert all(exchange(addr, f"x{i}\r\n".encode()) == f"v2: X{i}\r\n".encode() for i in range(6))
    st = sv.status()
    assert st["generation"] == 2 and st["pid"] == sv.pid


@pytest.mark.parametrize("broken, error", [
    ('def handle(line):\n    return ("v2 " + line\n', "SyntaxError"),
    ('import no_such_module_for_preforkd\n\ndef handle(line):\n    return line\n', "ModuleNotFoundError"),
    ('def handler(line):\n    return line\n', "has no attribute handle"),
], ids=["syntax-error", "import-error", "missing-handler"])
def test_broken_new_code_is_refused(supervisor, tmp_path, broken, error):
    write_handler(tmp_path, 'def handle(line):\n    return "v1 " + line\n')
    sv = supervisor(HANDLER_CONFIG)
    addr = sv.tcp("app")
    before = set(sv.worker_pids())
    write_handler(tmp_path, broken)
    sv.signal(signal.SIGHUP)
    ev = sv.wait_event("config.reload_failed")
    assert "new code or configuration does not start" in ev["error"] and error in ev["error"], ev
    assert len(ev["error"].splitlines()) == 1
    st = sv.status()
    assert st["generation"] == 1 and st["reload"]["state"] == "failed" and error in st["reload"]["error"]
    assert st["pid"] == sv.pid and set(sv.worker_pids()) == before
    assert exchange(addr, b"still\r\n") == b"v1 still\r\n"
    assert not sv.log.find("config.reexec")
    res = reload_cli(sv)  # `preforkd reload` refuses it too, with the reason
    assert res.returncode == 1 and error in res.stderr
    assert exchange(addr, b"still\r\n") == b"v1 still\r\n"
    # Repaired code is taken.
    write_handler(tmp_path, 'def handle(line):\n    return "v3 " + line\n')
    assert reload_cli(sv).returncode == 0
    assert exchange(addr, b"ok\r\n") == b"v3 ok\r\n"


# -- signals ------------------------------------------------------------------------


def test_hup_twice(supervisor):
    """Each HUP reloads again (no signal left blocked after the exec)..."""
    sv = supervisor(ECHO.format(workers=2))
    addr = sv.tcp("echo")
    for n in (1, 2, 3):
        ev = hup_and_wait(sv, n)
        assert ev["generation"] == n + 1 and ev["pid"] == sv.pid
        assert echo_ok(addr)
    wait_for(lambda: settled(sv, {"echo": 2}), message="settled")


def test_hup_during_a_reload_is_not_lost(supervisor):
    """...and a HUP that arrives while a reload is under way (here: while the new
    code is being checked) is acted on once that reload has finished."""
    sv = supervisor(ECHO.format(workers=2))
    sv.signal(signal.SIGHUP)
    # Wait until that reload has begun (a HUP that arrives before it does is rightly
    # coalesced into it: the reload reads the file after both).
    wait_for(lambda: sv.status()["reload"]["seq"] == 1, message="the first reload under way")
    sv.signal(signal.SIGHUP)  # during the check, or during the new image's start: either way, one more
    ev = sv.wait_event("config.reloaded", count=2)
    assert ev["generation"] == 3 and ev["pid"] == sv.pid
    st = wait_for(lambda: settled(sv, {"echo": 2}), message="settled")
    assert st["generation"] == 3 and len(sv.log.find("config.reloaded")) == 2


def fd_list(pid: int) -> Dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


def test_burst_of_50_hups(supervisor):
    sv = supervisor('''
        [[service]]
        name = "echo"
        listen = ["tcp://127.0.0.1:0", "unix:run/echo.sock"]
        workers = 2

        [[service]]
        name = "other"
        listen = ["tcp://127.0.0.1:0"]
        workers = 1
    ''')
    targets = {"echo": 2, "other": 1}
    addr = sv.tcp("echo")
    master = psutil.Process(sv.pid)
    wait_for(lambda: settled(sv, targets), message="settled")
    fds_before, listing_before = master.num_fds(), fd_list(sv.pid)
    with Load(addr, short=2, long=1) as load:
        for _ in range(50):
            sv.signal(signal.SIGHUP)
            time.sleep(0.01)  # the burst's pace, not synchronisation
        # Idle: no reload in progress and none pending (a pending one starts the
        # moment the previous one ends), one pool per service, all of the last generation.
        st = wait_for(lambda: settled(sv, targets), timeout=60, message="settled after the burst")
    assert load.bad() == {}, load.failures
    reloads = sv.log.find("config.reloaded")
    assert reloads and st["generation"] == 1 + len(reloads) and st["reload"]["state"] == "ok"
    assert {e["pid"] for e in reloads} == {sv.pid} and st["pid"] == sv.pid
    assert not sv.log.find("config.reload_failed")
    workers = {w["pid"] for svc in st["services"] for w in svc["workers"]}
    assert master_children(sv) == sorted(workers)  # no second master, no stray pool
    # Blocked across exec, several HUPs become one pending signal (signal(7)): fewer
    # than 50 are received, and each received while a reload runs adds at most one more.
    received = len(sv.log.find("signal.received", signal="SIGHUP"))
    assert 2 <= len(reloads) <= received <= 50
    fds_after, listing_after = master.num_fds(), fd_list(sv.pid)
    assert fds_after == fds_before, (listing_before, listing_after)
    print(f"\n50 HUPs: {received} received, {len(reloads)} reloads, generation {st['generation']}, "
          f"master fds {fds_before} -> {fds_after}")
    # Still a working, reloadable supervisor.
    assert echo_ok(addr) and echo_ok(sv.tcp("other"))
    res = reload_cli(sv)
    assert res.returncode == 0, res.stderr
    assert sv.status()["generation"] == st["generation"] + 1
