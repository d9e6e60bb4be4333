"""Zero-downtime reload: SIGHUP re-execs the master in place (same PID)."""

import os
import signal
import socket
import threading
import time

import psutil

from conftest import connect, exchange, recv_until, run_cli, wait_for

BODY = '''
[supervisor]
pidfile = "run/preforkd.pid"
control_socket = "run/preforkd.sock"
graceful_timeout = 15
python_path = ["."]
[log]
format = "json"
level = "info"
[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:0"]
handler = "{handler}"
workers = {workers}
'''


def config(handler="preforkd.services:echo", workers=2, extra=""):
    return BODY.format(handler=handler, workers=workers) + extra


def rewrite(sv, body):
    sv.config.write_text(body)


def settled(sv, service, count):
    """The pool has exactly *count* idle workers, all of the newest generation."""
    st = sv.status()
    svc = next(s for s in st["services"] if s["name"] == service)
    gens = {w["generation"] for w in svc["workers"]}
    return (len(svc["workers"]) == count and gens == {st["generation"]} and st["state"] == "running"
            and not st["retiring_workers"] and all(w["state"] == "idle" for w in svc["workers"]))


class Clients:
    """Short-connection clients plus long-lived ones sending a line every few ms."""

    def __init__(self, addr, short=3, long=3, long_seconds=1.5):
        self.addr, self.long_seconds = addr, long_seconds
        self.short_ok = self.long_done = self.lines = 0
        self.failures = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._short, args=(i,), daemon=True) for i in range(short)]
        self.threads += [threading.Thread(target=self._long, args=(i,), daemon=True) for i in range(long)]
        for t in self.threads:
            t.start()

    def _fail(self, what):
        with self._lock:
            self.failures.append(what)

    def _short(self, n):
        i = 0
        while not self._stop.is_set():
            msg = f"s{n}-{i}".encode()
            i += 1
            try:
                got = exchange(self.addr, msg + b"\n")
            except OSError as exc:
                self._fail(f"short: {exc!r}")
                continue
            if got != msg + b"\r\n":
                self._fail(f"short wrong reply: {got!r}")
            else:
                with self._lock:
                    self.short_ok += 1

    def _long(self, n):
        c = 0
        while not self._stop.is_set():
            c += 1
            try:
                with connect(self.addr, timeout=20) as s:
                    end = time.monotonic() + self.long_seconds
                    i = 0
                    while time.monotonic() < end:
                        msg = f"l{n}-{c}-{i}".encode()
                        s.sendall(msg + b"\n")
                        got = recv_until(s)
                        if got != msg + b"\r\n":
                            self._fail(f"long wrong reply: {got!r}")
                            break
                        i += 1
                        with self._lock:
                            self.lines += 1
                        time.sleep(0.005)
                    else:
                        with self._lock:
                            self.long_done += 1
            except OSError as exc:
                self._fail(f"long: {exc!r}")

    def stop(self):
        self._stop.set()
        for t in self.threads:
            t.join(60)


def test_twenty_reloads_under_load_lose_nothing(supervisor):
    sv = supervisor(config(workers=4))
    pid = sv.pid
    clients = Clients(sv.tcp("echo"))
    durations = []
    try:
        wait_for(lambda: clients.short_ok > 20 and clients.lines > 20)
        for n in range(1, 21):
            res = run_cli("reload", "-c", str(sv.config), timeout=90)
            assert res.returncode == 0, res.stderr
            ev = sv.wait_event("config.reloaded", count=n)
            durations.append(ev["duration_ms"])
            assert sv.status()["pid"] == pid
        done = clients.long_done
        wait_for(lambda: clients.long_done >= done + 3)  # long-lived connections open at the last HUP complete
    finally:
        clients.stop()
    print(f"\n20 reloads: short ok {clients.short_ok}, long-lived completed {clients.long_done}, "
          f"lines {clients.lines}, failures {len(clients.failures)}, HUP->accepting max {max(durations)} ms, "
          f"median {sorted(durations)[10]} ms")
    assert clients.failures == []
    assert sv.status()["generation"] == 21
    wait_for(lambda: settled(sv, "echo", 4))


def test_reload_adds_and_removes_listeners_and_changes_workers(supervisor, tmp_path):
    sv = supervisor(config(extra='''
        [[service]]
        name = "second"
        listen = ["tcp://127.0.0.1:0", "unix:run/second.sock"]
        workers = 1
    '''))
    echo_port = sv.tcp("echo")
    second_port = sv.tcp("second")
    assert (tmp_path / "run" / "second.sock").exists()
    # add a listener to echo, remove the "second" service, change the worker count
    rewrite(sv, config(workers=3).replace('listen = ["tcp://127.0.0.1:0"]',
                                          'listen = ["tcp://127.0.0.1:0", "unix:run/added.sock"]'))
    sv.signal(signal.SIGHUP)
    sv.wait_event("config.reloaded", generation=2)
    assert sv.tcp("echo") == echo_port  # a port-0 listener keeps its port
    assert exchange(echo_port, b"same port\n") == b"same port\r\n"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(tmp_path / "run" / "added.sock"))
        s.sendall(b"added\n")
        assert recv_until(s) == b"added\r\n"
    wait_for(lambda: not (tmp_path / "run" / "second.sock").exists())
    wait_for(lambda: settled(sv, "echo", 3))
    assert [s["name"] for s in sv.status()["services"]] == ["echo"]

    def refused():
        try:
            socket.create_connection(second_port, timeout=2).close()
        except ConnectionRefusedError:
            return True
        return False
    wait_for(refused, message="the removed TCP listener to refuse")


def test_invalid_config_keeps_old_one_serving(supervisor):
    sv = supervisor(config())
    addr = sv.tcp("echo")
    workers = sorted(sv.worker_pids())
    rewrite(sv, config().replace("workers = 2", 'workers = "many"'))
    res = run_cli("reload", "-c", str(sv.config))  # the CLI refuses before signalling
    assert res.returncode == 1 and "service[0].workers" in res.stderr
    sv.signal(signal.SIGHUP)  # the master refuses on its own too
    ev = sv.wait_event("config.reload_failed")
    assert "service[0].workers" in ev["error"]
    st = sv.status()
    assert st["generation"] == 1 and st["reload"]["state"] == "failed"
    assert sorted(sv.worker_pids()) == workers
    assert exchange(addr, b"still serving\n") == b"still serving\r\n"


def test_broken_new_code_is_refused(supervisor, tmp_path):
    mod = tmp_path / "myhandler.py"
    mod.write_text("def handle(line):\n    return 'v1 ' + line\n")
    sv = supervisor(config(handler="myhandler:handle"))
    addr = sv.tcp("echo")
    assert exchange(addr, b"x\n") == b"v1 x\r\n"
    mod.write_text("def handle(line)\n    return 'broken'\n")  # SyntaxError
    res = run_cli("reload", "-c", str(sv.config), timeout=60)
    assert res.returncode == 1
    mod.write_text("import no_such_dependency_xyz\ndef handle(line):\n    return line\n")
    sv.signal(signal.SIGHUP)
    ev = sv.wait_event("config.reload_failed", count=1)
    assert "does not start" in ev["error"] or "cannot import" in ev["error"]
    wait_for(lambda: len(sv.log.find("config.reload_failed")) >= 1)
    assert sv.status()["generation"] == 1
    assert exchange(addr, b"y\n") == b"v1 y\r\n"


def test_new_code_takes_effect_without_failed_connections(supervisor, tmp_path):
    mod = tmp_path / "myhandler.py"
    mod.write_text("def handle(line):\n    return 'v1 ' + line\n")
    sv = supervisor(config(handler="myhandler:handle", workers=3))
    addr = sv.tcp("echo")
    seen, failures = set(), []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                got = exchange(addr, b"q\n")
                seen.add(got)
                if got not in (b"v1 q\r\n", b"v2 q\r\n"):
                    failures.append(got)
            except OSError as exc:
                failures.append(repr(exc))

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        wait_for(lambda: b"v1 q\r\n" in seen)
        mod.write_text("def handle(line):\n    return 'v2 ' + line\n")
        os.utime(mod, (time.time() + 5, time.time() + 5))  # never trust an old .pyc
        sv.signal(signal.SIGHUP)
        sv.wait_event("config.reloaded", generation=2)
        wait_for(lambda: exchange(addr, b"q\n") == b"v2 q\r\n")
    finally:
        stop.set()
        t.join(30)
    assert failures == []


def test_hup_twice_reloads_twice(supervisor):
    sv = supervisor(config())
    sv.signal(signal.SIGHUP)
    sv.wait_event("config.reloaded", generation=2)
    sv.signal(signal.SIGHUP)
    sv.wait_event("config.reloaded", generation=3)
    assert sv.status()["pid"] == sv.pid
    assert exchange(sv.tcp("echo"), b"x\n") == b"x\r\n"


def test_burst_of_50_hups(supervisor):
    sv = supervisor(config(workers=3))
    master = psutil.Process(sv.pid)
    fds_before = master.num_fds()
    addr = sv.tcp("echo")
    for _ in range(50):
        os.kill(sv.pid, signal.SIGHUP)
        time.sleep(0.01)  # the pacing of the burst itself, not synchronisation
    # once settled: one master (same pid), one pool of the newest generation
    wait_for(lambda: settled(sv, "echo", 3), timeout=90, interval=0.2)
    st = sv.status()
    assert st["pid"] == sv.pid and st["generation"] >= 2
    assert exchange(addr, b"after burst\n") == b"after burst\r\n"
    kids = master.children()
    assert len(kids) == 3, kids
    assert master.num_fds() == fds_before
    assert not sv.log.find("config.reload_failed")
