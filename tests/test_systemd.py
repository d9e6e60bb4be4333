"""systemd integration (issue 3): sd_notify, socket activation, the shipped units.

* sd_notify: a real ``AF_UNIX``/``SOCK_DGRAM`` socket stands in for systemd's
  ``NOTIFY_SOCKET`` and records every datagram the supervisor sends.
* Socket activation: the real ``systemd-socket-activate`` binds the sockets, waits
  for the first client, and execs ``python -m preforkd run`` with ``LISTEN_PID``,
  ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` (installed by ``tests/install-tools.sh``).
* ``systemd-analyze verify`` on the units in ``systemd/``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from conftest import ROOT, LogReader, Supervisor, exchange, recv_until, run_cli, wait_for, write_config

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

ECHO = '''
    [[service]]
    name = "echo"
    listen = ["tcp://127.0.0.1:0"]
    workers = 2
'''


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# -- sd_notify ------------------------------------------------------------------------


class NotifySocket:
    """A stand-in for systemd's notification socket: records each datagram as a
    dict of its ``KEY=VALUE`` lines (in arrival order, with the arrival time)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: List[Dict[str, str]] = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        while not self.closed.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            msg = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            msg["_usec"] = str(monotonic_usec())
            with self.lock:
                self.messages.append(msg)

    def close(self) -> None:
        self.closed.set()
        self.thread.join(5)
        self.sock.close()

    def all(self, key: Optional[str] = None) -> List[Dict[str, str]]:
        with self.lock:
            return [m for m in self.messages if key is None or key in m]

    def wait(self, key: str, count: int = 1, timeout: float = 30) -> Dict[str, str]:
        return wait_for(lambda: len(self.all(key)) >= count and self.all(key)[count - 1], timeout,
                        message=f"{count} x {key} on NOTIFY_SOCKET")

    def kinds(self) -> List[str]:
        """Each message by its leading key (READY, RELOADING, STOPPING, WATCHDOG, STATUS)."""
        out = []
        for m in self.all():
            for key in ("READY", "RELOADING", "STOPPING", "WATCHDOG"):
                if key in m:
                    out.append(key)
                    break
            else:
                out.append("STATUS")
        return out


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


def test_sd_notify_start_reload_stop(supervisor, notify):
    sv = supervisor(ECHO, env={"NOTIFY_SOCKET": notify.path})
    ready = notify.wait("READY")
    assert ready["READY"] == "1" and ready["MAINPID"] == str(sv.pid)
    assert "2 workers" in ready["STATUS"]
    assert exchange(sv.tcp("echo"), b"up\r\n") == b"up\r\n"  # READY=1 means accepting
    assert notify.kinds() == ["STATUS", "READY"]

    # A reload: RELOADING=1 (with the CLOCK_MONOTONIC time systemd needs), then READY=1
    # from the same main PID once the new generation serves.
    before = monotonic_usec()
    res = run_cli("reload", "-c", str(sv.config))
    assert res.returncode == 0, res.stderr
    after = monotonic_usec()
    reloading = notify.wait("RELOADING")
    assert reloading["RELOADING"] == "1" and before <= int(reloading["MONOTONIC_USEC"]) <= after
    ready2 = notify.wait("READY", 2)
    assert ready2["MAINPID"] == str(sv.pid) and "generation 2" in ready2["STATUS"]
    assert int(ready2["_usec"]) >= int(reloading["_usec"])
    assert [k for k in notify.kinds() if k != "STATUS"] == ["READY", "RELOADING", "READY"]

    # A failed reload also ends with READY=1 (systemd leaves "reloading"), saying why.
    write_config(sv.config.parent, ECHO.replace("workers = 2", "workers = 0"))
    sv.signal(signal.SIGHUP)
    sv.wait_event("config.reload_failed")
    notify.wait("RELOADING", 2)
    ready3 = notify.wait("READY", 3)
    assert "reload failed" in ready3["STATUS"] and "service[0].workers" in ready3["STATUS"]

    sv.signal(signal.SIGTERM)
    assert sv.wait_exit() == 0
    stopping = notify.wait("STOPPING")
    assert stopping["STOPPING"] == "1"
    assert [k for k in notify.kinds() if k != "STATUS"] == ["READY", "RELOADING", "READY", "RELOADING", "READY",
                                                           "STOPPING"]


def test_sd_notify_watchdog(supervisor, notify):
    sv = supervisor(ECHO, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "300000"})
    notify.wait("READY")
    pings = notify.wait("WATCHDOG", 6)  # every 150 ms: half of WATCHDOG_USEC
    first = notify.all("WATCHDOG")[0]
    assert pings["WATCHDOG"] == "1"
    assert (int(pings["_usec"]) - int(first["_usec"])) / 5 < 300_000  # well within the deadline on average
    n = len(notify.all("WATCHDOG"))
    assert run_cli("reload", "-c", str(sv.config)).returncode == 0
    notify.wait("WATCHDOG", n + 4)  # the new image keeps pinging


def test_sd_notify_watchdog_for_another_pid_is_not_ours(supervisor, notify):
    """``WATCHDOG_PID`` naming another process: the watchdog is not ours to feed."""
    sv = supervisor(ECHO, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
    notify.wait("READY")
    assert run_cli("reload", "-c", str(sv.config)).returncode == 0  # a few 50 ms periods pass meanwhile
    notify.wait("READY", 2)
    assert notify.all("WATCHDOG") == []


# -- socket activation ----------------------------------------------------------------

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None,
    reason="systemd-socket-activate is not installed (package systemd; tests/install-tools.sh installs it as root)")


class Activated(Supervisor):
    """``systemd-socket-activate ... python -m preforkd run -c CONFIG``: the same
    process becomes the supervisor (it execs), so PID, log and cleanup are as usual."""

    def __init__(self, config: Path, argv: List[str], env: Dict[str, str]) -> None:
        self.config = config
        self.proc = subprocess.Popen(argv, cwd=config.parent, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.pid = self.proc.pid
        self.log = LogReader(self.proc.stderr)
        self._out = LogReader(self.proc.stdout)
        self.seen_pids = {self.pid}


@pytest.fixture
def activated() -> Iterator[list]:
    started: List[Activated] = []
    yield started
    for sv in started:
        sv.kill_all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_activated(started: list, directory: Path, body: str, sockets: List[str], names: List[str],
                    setenv: Dict[str, str]) -> Activated:
    """Run preforkd under systemd-socket-activate. *body* and *sockets* may contain
    ``{port}`` and ``{stray}``: free TCP ports, picked again if one was taken meanwhile."""
    for _ in range(5):
        ports = {"port": free_port(), "stray": free_port()}
        cfg = write_config(directory, body.format(**ports))
        argv = [ACTIVATE]
        for s in sockets:
            argv += ["-l", s.format(**ports)]
        argv += ["--fdname=" + ":".join(names)]
        for key in setenv:
            argv += ["-E", key]
        argv += [sys.executable, "-m", "preforkd", "run", "-c", str(cfg)]
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        env.update(setenv)
        sv = Activated(cfg, argv, env)
        started.append(sv)
        wait_for(lambda sv=sv: sv.proc.poll() is not None or sv.log.text().count("Listening on") == len(sockets),
                 message="systemd-socket-activate listening")
        if sv.proc.poll() is None:
            sv.ports = ports  # type: ignore[attr-defined]
            return sv
        assert "Address already in use" in sv.log.text(), sv.log.text()  # a port was taken: pick others
    raise AssertionError("could not find free ports for systemd-socket-activate")


@needs_activate
def test_socket_activation_adopts_serves_and_keeps_across_reload(activated, tmp_path):
    unix_path = tmp_path / "act" / "echo.sock"
    stray_path = tmp_path / "act" / "stray.sock"
    unix_path.parent.mkdir()
    # The port-0 entry comes first: the activated socket must still go to the entry
    # with its exact address, the port-0 one being bound by preforkd itself.
    sv = start_activated(activated, tmp_path, '''
        [[service]]
        name = "echo"
        listen = ["tcp://127.0.0.1:0", "tcp://127.0.0.1:{port}", "unix:act/echo.sock"]
        workers = 2
    ''', ["127.0.0.1:{port}", str(unix_path), str(stray_path)], ["echo", "echo-unix", "stray"],
        {"PREFORKD_TEST_MARK": "activated"})
    port = sv.ports["port"]  # type: ignore[attr-defined]
    # systemd-socket-activate execs the service at the first client: that client is served.
    assert exchange(("127.0.0.1", port), b"first\r\n", timeout=30) == b"first\r\n"
    sv.wait_ready()
    assert sv.proc.pid == sv.pid and sv.status()["pid"] == sv.pid  # it exec'd: same process

    bound = {e["address"]: e["origin"] for e in sv.log.find("listener.bound", generation=1)}
    own = next(a for a in bound if a not in (f"tcp://127.0.0.1:{port}", f"unix:{unix_path}"))
    assert bound == {f"tcp://127.0.0.1:{port}": "activated", f"unix:{unix_path}": "activated", own: "bound"}
    unmatched = sv.wait_event("listener.activation_unmatched")
    assert unmatched["name"] == "stray" and unmatched["address"] == f"unix:{stray_path}"

    def serve_all() -> None:
        assert exchange(("127.0.0.1", port), b"tcp\r\n") == b"tcp\r\n"
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(unix_path))
            s.sendall(b"unix\n")
            assert recv_until(s) == b"unix\r\n"
        assert exchange(("127.0.0.1", int(own.rsplit(":", 1)[1])), b"own\r\n") == b"own\r\n"

    serve_all()
    with socket.socket(socket.AF_UNIX) as s, pytest.raises(ConnectionRefusedError):
        s.connect(str(stray_path))  # the unmatched socket was closed

    # Across a reload the activated sockets are kept (handed over like any listener).
    res = run_cli("reload", "-c", str(sv.config))
    assert res.returncode == 0, res.stderr
    bound2 = {e["address"]: e["origin"] for e in sv.log.find("listener.bound", generation=2)}
    assert bound2 == {f"tcp://127.0.0.1:{port}": "activated", f"unix:{unix_path}": "activated", own: "inherited"}
    assert sv.status()["pid"] == sv.pid
    serve_all()
    st = sv.status()
    assert {lst["origin"] for lst in st["services"][0]["listeners"]} == {"activated", "inherited"}

    # Stopping: the activated Unix socket file belongs to whoever activated us, not to preforkd.
    sv.signal(signal.SIGTERM)
    assert sv.wait_exit() == 0
    assert unix_path.exists()


@needs_activate
def test_socket_activation_with_notify(activated, tmp_path, notify):
    """The systemd set-up in one: activated listener, NOTIFY_SOCKET passed with -E.
    A configured port 0 takes an activated socket of any port on its host."""
    sv = start_activated(activated, tmp_path, '''
        [[service]]
        name = "echo"
        listen = ["tcp://127.0.0.1:0"]
        workers = 1
    ''', ["127.0.0.1:{port}"], ["echo"], {"NOTIFY_SOCKET": notify.path})
    port = sv.ports["port"]  # type: ignore[attr-defined]
    assert exchange(("127.0.0.1", port), b"hi\r\n", timeout=30) == b"hi\r\n"
    ready = notify.wait("READY")
    assert ready["MAINPID"] == str(sv.pid)
    assert [(e["address"], e["origin"]) for e in sv.log.find("listener.bound")] == [
        (f"tcp://127.0.0.1:{port}", "activated")]
    sv.signal(signal.SIGHUP)
    notify.wait("READY", 2)
    assert [e["origin"] for e in sv.log.find("listener.bound", generation=2)] == ["activated"]
    assert exchange(("127.0.0.1", port), b"again\r\n") == b"again\r\n"


# -- the shipped units ----------------------------------------------------------------

UNITS = ROOT / "systemd"


def unit_settings(path: Path) -> Dict[str, List[str]]:
    """``Key=value`` settings of a unit file (all values of repeated keys)."""
    out: Dict[str, List[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_units_say_what_the_docs_say():
    svc = unit_settings(UNITS / "preforkd.service")
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["main"]
    assert svc["KillMode"] == ["mixed"] and svc["Restart"] == ["on-failure"]
    assert svc["RuntimeDirectory"] == ["preforkd"]
    start, reload_ = svc["ExecStart"][0].split(), svc["ExecReload"][0].split()
    assert start[1:3] == ["run", "-c"] and reload_[1:3] == ["reload", "-c"]
    assert start[0] == reload_[0] and start[3] == reload_[3] == "/etc/preforkd/preforkd.toml"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert svc[key] == ["yes"], key
    assert svc["ProtectSystem"] == ["strict"]
    # The example configuration fits in the unit: its runtime files live in the
    # RuntimeDirectory, and systemd waits longer than graceful_timeout before SIGKILL.
    example = tomllib.loads((ROOT / "etc" / "preforkd.toml").read_text())
    sup = example["supervisor"]
    assert int(svc["TimeoutStopSec"][0]) >= sup["graceful_timeout"] + 10
    assert sup["pidfile"].startswith("/run/preforkd/") and sup["control_socket"].startswith("/run/preforkd/")
    # Every socket of the activation example is a listener of that configuration.
    sock = unit_settings(UNITS / "preforkd.socket")
    configured = {a for s in example["service"] for a in s["listen"]}
    assert sock["ListenStream"]
    for listen in sock["ListenStream"]:
        addr = f"unix:{listen}" if listen.startswith("/") else f"tcp://{listen}"
        assert addr in configured, listen
        assert not listen.startswith("/run/preforkd/")  # the service's RuntimeDirectory is emptied on stop


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (package systemd; tests/install-tools.sh installs it as root)")
    # verify insists that ExecStart's program exists: point it at this checkout's.
    program = Path(sys.executable).parent / "preforkd"
    if not program.exists():
        program = tmp_path / "preforkd"
        program.write_text(f"#!/bin/sh\nexec {sys.executable} -m preforkd \"$@\"\n")
        program.chmod(0o755)
    for unit in ("preforkd.service", "preforkd.socket"):
        text = (UNITS / unit).read_text()
        (tmp_path / unit).write_text(re.sub(r"/usr/(local/)?bin/preforkd\b", str(program), text))
    res = subprocess.run([analyze, "verify", "--man=no", "preforkd.service", "preforkd.socket"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if "preforkd" in ln]
    assert res.returncode == 0 and ours == [], res.stdout + res.stderr
    # And it is not vacuous: a misspelt setting is reported.
    bad = (tmp_path / "preforkd.service").read_text().replace("KillMode=mixed", "KillMode=mixed\nKilMode=mixed")
    (tmp_path / "preforkd.service").write_text(bad)
    res = subprocess.run([analyze, "verify", "--man=no", "preforkd.service"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert "KilMode" in res.stdout + res.stderr
