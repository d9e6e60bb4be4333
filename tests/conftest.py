"""Test harness: start the real supervisor as a subprocess and talk to it.

Rules every test keeps (see docs/testing.md):

* no fixed ports: listeners use ``tcp://127.0.0.1:0`` and tests read the bound
  address from the ``listener.bound`` event (or ``status --json``);
* no sleeps as synchronisation: :func:`wait_for` polls a condition with a deadline;
* every process a test starts is stopped by its PID, even when the test fails
  (the :class:`Supervisor` fixture kills the master and every worker it saw).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
PREFORKD = [sys.executable, "-m", "preforkd"]
DEFAULT_TIMEOUT = 30.0


def wait_for(predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll *predicate* until it returns something truthy; return that.

    :raises AssertionError: after *timeout* seconds.
    """
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except (OSError, ValueError, KeyError) as exc:
            last_exc = exc
            result = None
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


def run_cli(*args: str, cwd: Optional[Path] = None, timeout: float = 60, env: Optional[dict] = None,
            input: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run ``python -m preforkd ARGS`` to completion."""
    return subprocess.run(PREFORKD + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, input=input)


def write_config(directory: Path, body: str, name: str = "preforkd.toml") -> Path:
    """Write a config file; a ``[supervisor]`` table with run/ paths is added when absent."""
    text = textwrap.dedent(body)
    if "[supervisor]" not in text:
        text = ('[supervisor]\npidfile = "run/preforkd.pid"\ncontrol_socket = "run/preforkd.sock"\n'
                'graceful_timeout = 10\n') + text
    if "[log]" not in text:
        text += '\n[log]\nformat = "json"\nlevel = "debug"\n'
    path = directory / name
    path.write_text(text)
    return path


class LogReader:
    """Collects JSON events from a stream (the supervisor's stderr) in a thread."""

    def __init__(self, stream: Any) -> None:
        self.events: List[Dict[str, Any]] = []
        self.raw: List[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            with self._lock:
                self.raw.append(line)
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if isinstance(ev, dict):
                    self.events.append(ev)

    def find(self, event: str, **fields: Any) -> List[Dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("event") == event
                    and all(e.get(k) == v for k, v in fields.items())]

    def text(self) -> str:
        with self._lock:
            return "".join(self.raw)


class Supervisor:
    """A ``preforkd run`` subprocess with its log, addresses and cleanup."""

    def __init__(self, config: Path, extra_env: Optional[dict] = None, args: Iterable[str] = ()) -> None:
        self.config = config
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.update(extra_env or {})
        self.proc = subprocess.Popen(PREFORKD + ["run", "-c", str(config), *args], cwd=config.parent,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.pid = self.proc.pid
        self.log = LogReader(self.proc.stderr)
        self._out = LogReader(self.proc.stdout)
        self.seen_pids: set = {self.pid}

    # -- waiting -------------------------------------------------------------
    def wait_event(self, event: str, timeout: float = DEFAULT_TIMEOUT, count: int = 1, **fields: Any) -> Dict[str, Any]:
        def check() -> Any:
            if self.proc.poll() is not None and len(self.log.find(event, **fields)) < count:
                raise AssertionError(f"supervisor exited ({self.proc.returncode}) before {event}:\n"
                                     + self.log.text()[-4000:])
            found = self.log.find(event, **fields)
            return found[count - 1] if len(found) >= count else None
        return wait_for(check, timeout, message=f"event {event} {fields or ''} x{count}")

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT) -> "Supervisor":
        self.wait_event("supervisor.ready", timeout)
        return self

    # -- facts ---------------------------------------------------------------
    def status(self) -> Dict[str, Any]:
        res = run_cli("status", "--json", "-c", str(self.config))
        assert res.returncode == 0, res.stderr + res.stdout
        st = json.loads(res.stdout)
        for svc in st.get("services", []):
            for w in svc["workers"]:
                self.seen_pids.add(w["pid"])
        return st

    def addresses(self, service: str) -> List[str]:
        """Bound addresses of *service*, from the latest listener.bound events."""
        evs = self.log.find("listener.bound", service=service)
        if not evs:
            return []
        newest = max(e.get("generation", 1) for e in evs)
        return list(dict.fromkeys(e["address"] for e in evs if e.get("generation", 1) == newest))

    def tcp(self, service: str) -> tuple:
        """(host, port) of the first TCP listener of *service*."""
        for addr in self.addresses(service):
            if addr.startswith("tcp://"):
                hostport = addr[len("tcp://"):]
                host, _, port = hostport.rpartition(":")
                return host.strip("[]"), int(port)
        raise AssertionError(f"no tcp listener for {service}")

    def worker_pids(self, service: Optional[str] = None) -> List[int]:
        pids = []
        for svc in self.status()["services"]:
            if service is None or svc["name"] == service:
                pids += [w["pid"] for w in svc["workers"]]
        return pids

    def children(self) -> List[int]:
        try:
            kids = [p.pid for p in psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            kids = []
        self.seen_pids.update(kids)
        return kids

    # -- stopping ------------------------------------------------------------
    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def kill_all(self) -> None:
        """Stop the master and every process it was seen with, by PID."""
        self.children()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for pid in self.seen_pids - {self.pid}:
            try:
                p = psutil.Process(pid)
                if "preforkd" in " ".join(p.cmdline()) or p.ppid() in self.seen_pids:
                    p.kill()
            except (psutil.Error, OSError):
                pass


@pytest.fixture
def supervisor(tmp_path: Path):
    """Factory: ``sv = supervisor(config_text)`` starts ``preforkd run`` and waits
    until it is ready (pass ``ready=False`` not to wait). All are killed at teardown."""
    started: List[Supervisor] = []

    def start(body: str, ready: bool = True, env: Optional[dict] = None, name: str = "preforkd.toml",
              directory: Optional[Path] = None) -> Supervisor:
        cfg = write_config(directory or tmp_path, body, name)
        sv = Supervisor(cfg, extra_env=env)
        started.append(sv)
        if ready:
            sv.wait_ready()
            sv.children()
        return sv

    yield start
    for sv in started:
        sv.kill_all()


def connect(addr: tuple, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(addr, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_until(sock: socket.socket, terminator: bytes = b"\r\n", limit: int = 1 << 20) -> bytes:
    """Read until *terminator* has arrived (or EOF); returns everything read."""
    data = b""
    while terminator not in data and len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def recv_all(sock: socket.socket) -> bytes:
    """Read until EOF."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def exchange(addr: tuple, payload: bytes, expect_lines: int = 1, timeout: float = 10.0) -> bytes:
    """Connect, send *payload*, read *expect_lines* CRLF lines, close."""
    with connect(addr, timeout) as s:
        s.sendall(payload)
        data = b""
        while data.count(b"\r\n") < expect_lines:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
