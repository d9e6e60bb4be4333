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
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import psutil
import pytest
from hypothesis import settings

# Property-based tests run on a loaded 2-core machine: no per-example deadline.
settings.register_profile("preforkd", deadline=None)
settings.load_profile("preforkd")

ROOT = Path(__file__).resolve().parent.parent
PREFORKD = [sys.executable, "-m", "preforkd"]
DEFAULT_TIMEOUT = 30.0
# The default configuration file of the command line: the tests name theirs.
os.environ.pop("PREFORKD_CONFIG", None)


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
            input: Optional[str] = None) -> subprocess.CompletedProcess:  # noqa: A002 - subprocess.run's name
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

    def __init__(self, config: Path, extra_env: Optional[dict] = None, args: Iterable[str] = (),
                 argv: Optional[List[str]] = None, stdout: Any = subprocess.PIPE,
                 program: Optional[List[str]] = None) -> None:
        """Start ``preforkd run -c CONFIG ARGS`` (or ``preforkd ARGV``) in the config's
        directory; *stdout* may be a terminal's file descriptor instead of a pipe;
        *program* replaces ``python -m preforkd`` (an installed copy)."""
        self.config = config
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.update(extra_env or {})
        command = argv if argv is not None else ["run", "-c", str(config), *args]
        self.proc = subprocess.Popen((program or PREFORKD) + command, cwd=config.parent,
                                     stdin=subprocess.DEVNULL, stdout=stdout,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.pid = self.proc.pid
        self.log = LogReader(self.proc.stderr)
        self._out = LogReader(self.proc.stdout) if self.proc.stdout else None
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

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT) -> Supervisor:
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


def pytest_collection_finish(session: pytest.Session) -> None:
    """Begin building the real-systemd test's container tree now, while the other tests
    run, when that test is selected and the tree is not cached (tests/container.py)."""
    if any(item.nodeid.startswith("tests/test_systemd_real.py") or "test_systemd_real.py" in item.nodeid
           for item in session.items):
        import container

        container.start_background_build()


@pytest.fixture(scope="session")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the checkout's files (what git tracks, and new files it does not
    ignore), to build from: a build writes into its source tree (build/, *.egg-info), and
    parallel test processes (pytest-xdist) must not build in the same one."""
    dest = tmp_path_factory.mktemp("source") / "preforkd"
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, timeout=60)
    if listed.returncode == 0:
        for name in listed.stdout.decode().split("\0"):
            src = ROOT / name
            if name and src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
    else:  # not a git checkout: everything but what a build or a run leaves behind
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "__pycache__", "*.egg-info", ".pytest_cache", "run"))
    return dest


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory, source_copy: Path) -> Path:
    """A directory of wheels: preforkd built from this checkout, its dependencies, and
    setuptools (to build the checkout again offline), for ``pip install --no-index
    --find-links``. Made once per session with the package index's help."""
    wheels = tmp_path_factory.mktemp("wheelhouse")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    for args in (["wheel", "-w", str(wheels), str(source_copy)], ["download", "-d", str(wheels), "setuptools>=77"]):
        res = subprocess.run(pip + args, capture_output=True, text=True, timeout=300, cwd=wheels)
        assert res.returncode == 0, res.stdout + res.stderr
    return wheels


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


# -- client load ----------------------------------------------------------------


class Load:
    """The one load generator of the suite: clients that run until stopped and record
    every failure by kind (``refused``, ``reset``, ``timeout``, ``truncated``, ``wrong``).

    * *short* threads: connect, send one line, read the reply, close — again and again;
    * *long* threads: keep one connection open for a random lifetime (well under
      ``graceful_timeout``), sending a line every few ms and checking every reply;
      then open the next one. Each long connection is recorded as (start, end, ok).

    *expect* maps a sent line to the replies that are right for it (default: the echo).
    """

    def __init__(self, addr: Tuple[str, int], short: int = 3, long: int = 3,
                 lifetime: Tuple[float, float] = (0.3, 1.5),
                 expect: Optional[Callable[[str], List[str]]] = None) -> None:
        self.addr = addr
        self.expect = expect or (lambda line: [line])
        self.lifetime = lifetime
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.failures: List[str] = []
        self.spans: List[Tuple[float, float, bool]] = []
        self.long_threads = long
        self.last_start: Dict[int, float] = {}  # per long thread: start of its last finished connection
        self.threads = [threading.Thread(target=self._short, args=(i,), daemon=True) for i in range(short)]
        self.threads += [threading.Thread(target=self._long, args=(i,), daemon=True) for i in range(long)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _fail(self, kind: str, detail: str) -> None:
        with self.lock:
            self.counts[kind] += 1
            if len(self.failures) < 20:
                self.failures.append(f"{time.monotonic():.3f} {kind}: {detail}")

    @staticmethod
    def _kind(exc: BaseException) -> str:
        if isinstance(exc, ConnectionRefusedError):
            return "refused"
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return "reset"
        if isinstance(exc, socket.timeout):
            return "timeout"
        return "error"

    def _check(self, sock: socket.socket, line: str) -> Optional[str]:
        """Send *line*, read one reply line; returns a failure kind or None."""
        sock.sendall(line.encode() + b"\r\n")
        data = recv_until(sock)
        if not data.endswith(b"\r\n"):
            return "truncated"
        if data[:-2].decode() not in self.expect(line) or b"\r\n" in data[:-2]:
            return "wrong"
        return None

    def _short(self, tid: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            line = f"short-{tid}-{n}"
            try:
                with connect(self.addr, timeout=10) as s:
                    bad = self._check(s, line)
            except OSError as exc:
                self._fail(self._kind(exc), f"{line}: {exc!r}")
                continue
            if bad:
                self._fail(bad, line)
            else:
                with self.lock:
                    self.counts["short_ok"] += 1
            self.stop.wait(0.002)  # pacing: leave the two cores some air for the supervisor

    def _long(self, tid: int) -> None:
        rnd = random.Random(tid)
        c = 0
        while not self.stop.is_set():
            c += 1
            start = time.monotonic()
            end_at = start + rnd.uniform(*self.lifetime)
            ok = True
            lines = 0
            try:
                with connect(self.addr, timeout=10) as s:
                    while time.monotonic() < end_at:
                        lines += 1
                        line = f"long-{tid}-{c}-{lines}"
                        bad = self._check(s, line)
                        if bad:
                            self._fail(bad, f"{line} (long)")
                            ok = False
                            break
                        self.stop.wait(0.004)  # pacing
            except OSError as exc:
                self._fail(self._kind(exc), f"long-{tid}-{c} after {lines} lines: {exc!r}")
                ok = False
            with self.lock:
                self.counts["long_lines"] += lines
                self.counts["long_ok" if ok else "long_failed"] += 1
                self.spans.append((start, time.monotonic(), ok))
                self.last_start[tid] = start

    def all_long_started_after(self, t: float) -> bool:
        """Has every long thread finished a connection opened after *t* (so the one
        it had open at *t* has ended and been recorded)?"""
        with self.lock:
            return len(self.last_start) == self.long_threads and min(self.last_start.values()) > t

    def bad(self) -> Dict[str, int]:
        with self.lock:
            return {k: v for k, v in self.counts.items() if k not in ("short_ok", "long_ok", "long_lines")}
