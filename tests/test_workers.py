"""Worker pools: respawn, back-off, no orphans, recycling, signals, graceful stop."""

import os
import signal
import socket
import time

import psutil

from conftest import Load, connect, exchange, pid_gone, recv_all, recv_until, wait_for

POOL = '''
[supervisor]
pidfile = "run/preforkd.pid"
control_socket = "run/preforkd.sock"
graceful_timeout = 10
[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:0"]
workers = 3
'''


def test_kill_9_worker_under_load_is_replaced_others_unaffected(supervisor):
    sv = supervisor(POOL)
    pids = sv.worker_pids()
    assert len(pids) == 3
    with Load(sv.tcp("echo"), short=4, long=0) as load:
        wait_for(lambda: load.counts["short_ok"] > 50)
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        ev = sv.wait_event("worker.exited", child=victim)
        assert ev["signal"] == "SIGKILL"
        new = wait_for(lambda: [p for p in sv.worker_pids() if p not in pids], message="replacement")
        before = load.counts["short_ok"]
        wait_for(lambda: load.counts["short_ok"] > before + 50)
    now = sv.worker_pids()
    assert set(pids[1:]) <= set(now) and new[0] in now and len(now) == 3
    # at most the one connection the killed worker had in hand
    assert sum(load.bad().values()) <= 1, load.failures


def refused(addr):
    """True once nothing accepts connections on *addr* any more."""
    try:
        socket.create_connection(addr, timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_kill_9_master_leaves_no_orphans(supervisor):
    sv = supervisor(POOL.replace("graceful_timeout = 10", "graceful_timeout = 4"))
    addr = sv.tcp("echo")
    pids = sv.worker_pids()
    busy = connect(addr, timeout=20)  # one worker busy with a client that never leaves
    busy.sendall(b"hold\n")
    assert recv_until(busy) == b"hold\r\n"
    try:
        t0 = time.monotonic()
        os.kill(sv.pid, signal.SIGKILL)
        sv.wait_exit()
        # The port is let go at once (a restarted supervisor could bind it again),
        # while the busy worker is still finishing its connection (a graceful stop)...
        wait_for(lambda: refused(addr), timeout=5, message="the port to be released")
        busy.sendall(b"still there\n")
        assert recv_until(busy) == b"still there\r\n"
        # ...for graceful_timeout at most: then every worker is gone.
        wait_for(lambda: all(pid_gone(p) for p in pids), timeout=15, message="workers to exit")
        assert recv_all(busy) == b""
        assert time.monotonic() - t0 < 15
    finally:
        busy.close()


def test_crash_looping_service_backs_off_while_another_serves(supervisor, tmp_path):
    (tmp_path / "crashy.py").write_text(
        "import preforkd\n"
        "class Crashy(preforkd.LineHandler):\n"
        "    @classmethod\n"
        "    def worker_init(cls):\n"
        "        raise ConnectionRefusedError('database is down')\n"
        "    def on_line(self, line):\n"
        "        return line\n")
    sv = supervisor('''
        [supervisor]
        pidfile = "run/p.pid"
        control_socket = "run/p.sock"
        python_path = ["."]
        [[service]]
        name = "crashy"
        listen = ["tcp://127.0.0.1:0"]
        handler = "crashy:Crashy"
        workers = 4
        [[service]]
        name = "echo"
        listen = ["tcp://127.0.0.1:0"]
        workers = 2
    ''', ready=False)
    sv.wait_event("listener.bound", service="echo")
    ev = sv.wait_event("worker.backoff", count=5, service="crashy", timeout=40)
    delays = [e["delay"] for e in sv.log.find("worker.backoff", service="crashy")]
    assert delays[:5] == sorted(delays[:5]) and delays[4] > delays[0], delays
    assert ev["reason"] == "worker_init failed"
    assert sv.log.find("worker.init_failed", service="crashy")
    # the healthy service serves throughout
    echo = sv.tcp("echo")
    for i in range(20):
        assert exchange(echo, f"up {i}\n".encode()) == f"up {i}\r\n".encode()
    spawned = len(sv.log.find("worker.spawned", service="crashy"))
    assert spawned < 20, f"fork storm: {spawned} spawns"
    st = sv.status()
    crashy = next(s for s in st["services"] if s["name"] == "crashy")
    assert crashy["backoff"]["failures"] >= 5


def test_max_requests_recycles_worker(supervisor):
    sv = supervisor(POOL.replace("workers = 3", "workers = 1\nmax_requests = 3"))
    addr = sv.tcp("echo")
    first = sv.worker_pids()[0]
    for _i in range(3):
        assert exchange(addr, b"x\n") == b"x\r\n"
    sv.wait_event("worker.max_requests")
    ev = sv.wait_event("worker.exited", child=first)
    assert ev["exit_code"] == 0
    second = wait_for(lambda: [p for p in sv.worker_pids() if p != first])
    assert exchange(addr, b"y\n") == b"y\r\n"
    assert not sv.log.find("worker.backoff")
    assert second


def test_workers_are_named_in_ps(supervisor):
    sv = supervisor(POOL)
    names = sorted(" ".join(psutil.Process(p).cmdline()).strip() for p in sv.worker_pids())
    assert names == ["preforkd: worker echo#1", "preforkd: worker echo#2", "preforkd: worker echo#3"]
    assert "preforkd: master" in " ".join(psutil.Process(sv.pid).cmdline())


def test_ttin_ttou_resize_pool(supervisor):
    sv = supervisor(POOL)
    sv.signal(signal.SIGTTIN)
    wait_for(lambda: len(sv.worker_pids()) == 4 and all(
        w["state"] == "idle" for w in sv.status()["services"][0]["workers"]))
    sv.signal(signal.SIGTTOU)  # one at a time: a second pending TTOU would coalesce with the first
    sv.wait_event("pool.resized", workers=3)
    sv.signal(signal.SIGTTOU)
    wait_for(lambda: len(sv.worker_pids()) == 2)
    assert sv.log.find("pool.resized", workers=2)
    assert exchange(sv.tcp("echo"), b"resized\n") == b"resized\r\n"


def test_usr1_reopens_log_file(supervisor, tmp_path):
    sv = supervisor(POOL + 'max_line_length = 8\n[log]\nformat = "json"\nlevel = "debug"\n'
                           'file = "logs/preforkd.log"\n', ready=False)
    log = tmp_path / "logs" / "preforkd.log"
    wait_for(lambda: log.exists() and "supervisor.ready" in log.read_text())
    os.rename(log, tmp_path / "logs" / "preforkd.log.1")
    sv.signal(signal.SIGUSR1)
    # the master and its 3 workers each reopen the file
    wait_for(lambda: log.exists() and log.read_text().count('"log.reopened"') == 4)
    # what the workers log now lands in the new file
    addr = next(a for a in sv.status()["services"][0]["listeners"])["address"][len("tcp://"):]
    host, _, port = addr.rpartition(":")
    for _ in range(6):
        with connect((host, int(port))) as s:
            s.sendall(b"far too long a line\n")
            assert recv_all(s).startswith(b"ERROR line too long")
    wait_for(lambda: log.read_text().count("connection.line_too_long") == 6)
    assert "connection.line_too_long" not in (tmp_path / "logs" / "preforkd.log.1").read_text()
    sv.signal(signal.SIGTERM)
    assert sv.wait_exit() == 0
    assert "supervisor.stopped" in log.read_text()


def test_graceful_term_finishes_connection_in_hand(supervisor, tmp_path):
    sv = supervisor(POOL)
    addr = sv.tcp("echo")
    with connect(addr) as s:
        s.sendall(b"before\n")
        assert recv_until(s) == b"before\r\n"
        sv.signal(signal.SIGTERM)
        sv.wait_event("supervisor.stopping")
        for i in range(5):  # still served after TERM
            s.sendall(f"after {i}\n".encode())
            assert recv_until(s) == f"after {i}\r\n".encode()
        # while new clients are refused, not queued on a socket nobody accepts from
        wait_for(lambda: refused(addr), timeout=10, message="new connections to be refused")
        s.sendall(b"still\n")
        assert recv_until(s) == b"still\r\n"
        assert sv.proc.poll() is None
    assert sv.wait_exit() == 0
    sv.wait_event("supervisor.stopped")
    assert not (tmp_path / "run" / "preforkd.pid").exists()
    assert not (tmp_path / "run" / "preforkd.sock").exists()
    assert not sv.log.find("worker.killed")


def test_graceful_timeout_kills_a_connection_that_never_ends(supervisor):
    sv = supervisor(POOL.replace("graceful_timeout = 10", "graceful_timeout = 1"))
    with connect(sv.tcp("echo"), timeout=20) as s:
        s.sendall(b"hi\n")
        assert recv_until(s) == b"hi\r\n"
        t0 = time.monotonic()
        sv.signal(signal.SIGTERM)
        assert recv_all(s) == b""  # the worker is killed; the connection ends
        assert sv.wait_exit() == 0
        assert time.monotonic() - t0 < 15


def test_int_is_a_quick_stop(supervisor):
    sv = supervisor(POOL)
    pids = sv.worker_pids()
    with connect(sv.tcp("echo"), timeout=20) as s:
        s.sendall(b"hi\n")
        assert recv_until(s) == b"hi\r\n"
        sv.signal(signal.SIGINT)
        assert recv_all(s) == b""
    assert sv.wait_exit() == 0
    assert all(pid_gone(p) for p in pids)
    assert sv.log.find("supervisor.stopping", graceful=False)


def test_quit_stops_the_master_quickly_with_a_connection_in_hand(supervisor, tmp_path):
    """QUIT is a quick stop: with a client holding a connection open and a graceful
    timeout far longer than the test may run, the master still exits at once (its
    workers get QUIT, not TERM), and cleans up its files."""
    sv = supervisor(POOL.replace("graceful_timeout = 10", "graceful_timeout = 3600"))
    pids = sv.worker_pids()
    with connect(sv.tcp("echo"), timeout=20) as s:
        s.sendall(b"hi\n")
        assert recv_until(s) == b"hi\r\n"
        sv.signal(signal.SIGQUIT)
        assert recv_all(s) == b""  # the busy worker quit: no graceful finish
    assert sv.wait_exit(timeout=20) == 0
    assert all(pid_gone(p) for p in pids)
    assert sv.log.find("supervisor.stopping", signal="SIGQUIT", graceful=False)
    assert sv.log.find("supervisor.stopped")
    assert not (tmp_path / "run" / "preforkd.pid").exists() and not (tmp_path / "run" / "preforkd.sock").exists()


def test_hup_never_kills_the_supervisor(supervisor):
    sv = supervisor(POOL)
    sv.signal(signal.SIGHUP)
    sv.wait_event("config.reloaded")
    assert exchange(sv.tcp("echo"), b"alive\n") == b"alive\r\n"
    assert sv.proc.poll() is None


def test_workers_hold_only_their_own_listeners(supervisor, tmp_path):
    """A worker closes what it must not hold: the pidfile (its lock would outlive the
    master), the control socket, and the listening sockets of other pools."""
    sv = supervisor('''
        [[service]]
        name = "echo"
        listen = ["tcp://127.0.0.1:0", "unix:run/echo.sock"]
        workers = 1
        [[service]]
        name = "other"
        listen = ["tcp://127.0.0.1:0"]
        workers = 1
    ''')

    def fds(pid):
        out = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
        return out

    master = fds(sv.pid)
    assert str(tmp_path / "run" / "preforkd.pid") in master
    for service, listeners in (("echo", 2), ("other", 1)):
        (pid,) = sv.worker_pids(service)
        held = fds(pid)
        assert not any("preforkd.pid" in f or "scoreboard" in f for f in held), held
        assert len([f for f in held if f.startswith("socket:")]) == listeners, held
