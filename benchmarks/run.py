#!/usr/bin/env python3
"""preforkd benchmark harness: every workload against every peer, in one run.

    .venv/bin/python benchmarks/run.py            # the full run (what `make bench` does)
    .venv/bin/python benchmarks/run.py --quick    # smoke run: 1 run, 1 s cells

Writes docs/performance.md and docs/performance.png (a --quick run writes to
benchmarks/build/quick/ instead, unless --out-dir is given). See benchmarks/README.md.

Every process it starts is stopped by PID in a `finally`, even on errors.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import queue
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import ClassVar

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python" if (VENV / "bin" / "python").exists() else Path(sys.executable)
PREFORKD = VENV / "bin" / "preforkd"
LOADGEN = BENCH / "build" / "loadgen"
BASELINE = "naive"

NOTES_BEGIN = "<!-- notes:begin (kept verbatim by benchmarks/run.py) -->"
NOTES_END = "<!-- notes:end -->"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- process bookkeeping

class Reaper:
    """Every process the harness starts, stopped by PID in a finally."""

    def __init__(self) -> None:
        self.procs: list[psutil.Process] = []

    def track(self, pid: int) -> psutil.Process | None:
        try:
            p = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return None
        self.procs.append(p)
        return p

    def stop(self, proc: psutil.Process, timeout: float = 10.0) -> None:
        """SIGTERM the process, wait; then SIGKILL it and whatever it left behind."""
        try:
            family = [proc] + proc.children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
        _, alive = psutil.wait_procs([proc], timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                family += p.children(recursive=True)
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
        psutil.wait_procs(family, timeout=3)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for p in list(reversed(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(p, timeout=5)


REAPER = Reaper()


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, for the harness and every peer it starts
    (W7 holds 10,000 connections; nginx's worker_rlimit_nofile, preforkd does the same)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            buf = b""
            while len(buf) < 7:
                data = s.recv(64)
                if not data:
                    break
                buf += data
            return buf == b"+PONG\r\n"
    except OSError:
        return False


def tree_cpu(root: psutil.Process) -> float:
    """user+system seconds of the whole process tree under root, children that exited
    and were reaped included (cutime/cstime of their parents), zombies included."""
    total = 0.0
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return float("nan")
    for p in procs:
        try:
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float, float]:
    """(busy, total, process-time) jiffies of the whole machine from /proc/stat;
    process-time is user+nice+system, the part that is charged to some process."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    total = sum(vals[:8])
    return total - idle, total, vals[0] + vals[1] + vals[2]


# ---------------------------------------------------------------- peers

class PeerFailed(Exception):
    pass


class Peer:
    name = "?"
    label = "?"
    workers_note = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: psutil.Process | None = None
        self.popen: subprocess.Popen | None = None
        self.port = 0
        self.error = ""
        self.command = ""

    def version(self) -> str:
        return ""

    def start(self) -> None:
        raise NotImplementedError

    def root(self) -> psutil.Process:
        assert self.proc is not None
        return self.proc

    def alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return self.proc is not None and self.proc.is_running() and \
            self.proc.status() != psutil.STATUS_ZOMBIE

    def stop(self) -> None:
        if self.proc is not None:
            REAPER.stop(self.proc)
            self.proc = None
        if self.popen is not None:
            with contextlib.suppress(Exception):
                self.popen.wait(timeout=1)

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ping(self.port, timeout=0.5):
                return
            if not self.alive():
                raise PeerFailed(f"exited during start-up{self._stderr_tail()}")
            time.sleep(0.05)
        raise PeerFailed(f"no +PONG on port {self.port} within {timeout:.0f} s{self._stderr_tail()}")

    def _stderr_tail(self) -> str:
        f = self.workdir / f"{self.name}.stderr"
        if f.exists():
            lines = [ln for ln in f.read_text(errors="replace").splitlines() if ln.strip()]
            if lines:
                return ": " + lines[-1][-300:]
        return ""

    def _spawn(self, argv: list[str], read_port: bool) -> None:
        self.command = " ".join(_shq(a) for a in argv)
        err = open(self.workdir / f"{self.name}.stderr", "wb")
        try:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if read_port else subprocess.DEVNULL,
                stderr=err, cwd=self.workdir, start_new_session=True)
        except OSError as e:
            raise PeerFailed(f"cannot run {argv[0]}: {e}") from e
        finally:
            err.close()
        self.proc = REAPER.track(self.popen.pid)
        if read_port:
            assert self.popen.stdout is not None
            line = _readline_timeout(self.popen.stdout, 15.0)
            if not line.strip().isdigit():
                raise PeerFailed(f"did not print its port (got {line[:80]!r}){self._stderr_tail()}")
            self.port = int(line)


def _shq(a: str) -> str:
    return a if re.fullmatch(r"[\w@%+=:,./-]+", a) else "'" + a.replace("'", "'\\''") + "'"


def _readline_timeout(f, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    fd = f.fileno()
    while time.monotonic() < deadline and not buf.endswith(b"\n"):
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")


class NaivePeer(Peer):
    name, label = "naive", "naive pre-fork (stdlib)"

    def __init__(self, workdir: Path, workers: int = 4) -> None:
        super().__init__(workdir)
        self.workers = workers

    def version(self) -> str:
        return f"Python {platform.python_version()}"

    def start(self) -> None:
        self._spawn([str(PY), str(BENCH / "naive_prefork.py"), "--workers", str(self.workers)], True)
        self.wait_ready()


class ForkingPeer(Peer):
    name, label = "forking", "ForkingTCPServer"

    def version(self) -> str:
        return f"Python {platform.python_version()} socketserver"

    def start(self) -> None:
        self._spawn([str(PY), str(BENCH / "forking_server.py")], True)
        self.wait_ready()


class AsyncioPeer(Peer):
    name, label = "asyncio", "asyncio (1 process)"

    def version(self) -> str:
        return f"Python {platform.python_version()} asyncio"

    def start(self) -> None:
        self._spawn([str(PY), str(BENCH / "asyncio_server.py")], True)
        self.wait_ready()


class NetServerPeer(Peer):
    name, label = "netserver", "Net::Server::PreFork"

    def version(self) -> str:
        try:
            out = subprocess.run(["perl", "-MNet::Server::PreFork", "-e",
                                  'printf "Net::Server %s, perl %vd", $Net::Server::VERSION, $^V'],
                                 capture_output=True, text=True, timeout=10)
            return out.stdout.strip() or out.stderr.strip()[:100]
        except (OSError, subprocess.SubprocessError) as e:
            return f"unknown ({e})"

    def start(self) -> None:
        if shutil.which("perl") is None:
            raise PeerFailed("perl not found")
        self._spawn(["perl", str(BENCH / "netserver_prefork.pl"), "0", "4"], True)
        self.wait_ready()


class RedisPeer(Peer):
    name, label = "redis", "redis-server"
    extra_args: ClassVar[list[str]] = []

    def version(self) -> str:
        exe = shutil.which("redis-server")
        if not exe:
            return "not installed"
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"v=(\S+)", out)
        return f"Redis {m.group(1)}" if m else out.strip()

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            raise PeerFailed("redis-server not installed (run benchmarks/setup.sh)")
        self.port = free_port()
        # protected-mode off: it is bound to 127.0.0.1 only, and the load generator spreads
        # short connections over 127.0.0.x source addresses, which protected mode refuses.
        self._spawn([exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                     "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
                     "--logfile", "", "--tcp-backlog", "1024", *self.extra_args], False)
        self.command = self.command.replace(f"--port {self.port}", "--port PORT")
        self.wait_ready()


PREFORKD_CONFIG = """\
[supervisor]
pidfile = "run/preforkd.pid"
control_socket = "run/preforkd.sock"
python_path = [{bench}]{supervisor_extra}
[log]
format = "json"
level = "info"
{logfile}
[[service]]
name = "pingpong"
listen = ["tcp://127.0.0.1:{port}"]
handler = "pingpong:handle"
workers = {workers}{service_extra}
"""


def _toml_keys(keys: dict | None) -> str:
    """Extra `key = value` lines (ints, floats, strings) for PREFORKD_CONFIG."""
    return "".join(f"\n{k} = {json.dumps(v)}" for k, v in (keys or {}).items())


def preforkd_config_text(bench: str, workers: int = 4, port: int = 0, logfile: str = "",
                         service: dict | None = None, supervisor: dict | None = None) -> str:
    return PREFORKD_CONFIG.format(bench=bench, port=port, workers=workers,
                                  logfile=f"file = {json.dumps(logfile)}" if logfile else "",
                                  supervisor_extra=_toml_keys(supervisor), service_extra=_toml_keys(service))


def write_preforkd_config(d: Path, workers: int = 4, port: int = 0, logfile: str = "",
                          service: dict | None = None, supervisor: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "preforkd.toml"
    cfg.write_text(preforkd_config_text(json.dumps(str(BENCH)), workers, port, logfile, service, supervisor))
    return cfg


class PreforkdPeer(Peer):
    """`preforkd run -c CONFIG` in the foreground; its stderr (JSON lines) is read by a
    thread that stamps every line with the time it arrived."""

    name, label = "preforkd", "preforkd"
    #: extra keys of the [[service]] and [supervisor] tables (the capacity variants below)
    service_keys: ClassVar[dict] = {}
    supervisor_keys: ClassVar[dict] = {}

    def __init__(self, workdir: Path, workers: int = 4, service_keys: dict | None = None) -> None:
        super().__init__(workdir / f"{self.name}-{workers}")
        self.workers = workers
        if service_keys is not None:
            self.service_keys = {**self.service_keys, **service_keys}
        self.events: queue.Queue = queue.Queue()
        self.config: Path | None = None
        self._reader: threading.Thread | None = None
        self._log = None

    def version(self) -> str:
        try:
            out = subprocess.run([str(PREFORKD), "--version"], capture_output=True, text=True, timeout=20)
            v = (out.stdout or out.stderr).strip().splitlines()
            if out.returncode == 0 and v:
                return v[0]
        except (OSError, subprocess.SubprocessError):
            pass
        try:
            out = subprocess.run([str(PY), "-c", "import importlib.metadata as m; print(m.version('preforkd'))"],
                                 capture_output=True, text=True, timeout=20)
            return f"preforkd {out.stdout.strip()}"
        except (OSError, subprocess.SubprocessError) as e:
            return f"unknown ({e})"

    def start(self) -> None:
        if not PREFORKD.exists():
            raise PeerFailed(f"{PREFORKD.relative_to(ROOT)} not found (make venv)")
        self.config = write_preforkd_config(self.workdir, self.workers, service=self.service_keys,
                                            supervisor=self.supervisor_keys)
        argv = [str(PREFORKD), "run", "-c", str(self.config)]
        self.command = " ".join(argv)
        try:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, cwd=self.workdir, start_new_session=True)
        except OSError as e:
            raise PeerFailed(f"cannot run preforkd: {e}") from e
        self.proc = REAPER.track(self.popen.pid)
        self._log = open(self.workdir / "preforkd.stderr", "wb")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        bound = self.wait_event("listener.bound", 20.0)
        m = re.search(r":(\d+)$", str(bound.get("address", "")))
        if not m:
            raise PeerFailed(f"listener.bound without a port: {bound}")
        self.port = int(m.group(1))
        self.wait_event("supervisor.ready", 20.0)
        self.wait_ready()

    def _read(self) -> None:
        assert self.popen is not None and self.popen.stderr is not None
        for raw in self.popen.stderr:
            t = time.monotonic()
            if self._log:
                with contextlib.suppress(ValueError):
                    self._log.write(raw)
                    self._log.flush()
            try:
                ev = json.loads(raw)
            except ValueError:
                ev = {"event": "(not json)", "line": raw.decode(errors="replace").rstrip()}
            if isinstance(ev, dict):
                ev["_t"] = t
                self.events.put(ev)
        self.events.put({"event": "(eof)", "_t": time.monotonic()})

    def wait_event(self, name: str, timeout: float, pred=None, collect: list | None = None) -> dict:
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerFailed(f"no {name} event within {timeout:.0f} s (last: {seen[-3:]})")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            seen.append(ev.get("event"))
            if collect is not None:
                collect.append(ev)
            if ev.get("event") == name and (pred is None or pred(ev)):
                return ev
            if ev.get("event") == "(eof)":
                rc = self.popen.poll() if self.popen else None
                raise PeerFailed(f"preforkd exited (code {rc}) before {name}{self._stderr_tail()}")

    def drain_events(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def _stderr_tail(self) -> str:
        f = self.workdir / "preforkd.stderr"
        if f.exists():
            lines = [ln for ln in f.read_text(errors="replace").splitlines() if ln.strip()]
            for ln in reversed(lines):
                if '"error"' in ln or "Error" in ln or "error" in ln:
                    return ": " + ln[-300:]
            if lines:
                return ": " + lines[-1][-300:]
        return ""

    def stop(self) -> None:
        super().stop()
        if self._reader is not None:
            self._reader.join(timeout=2)
        if self._log:
            self._log.close()
            self._log = None

    def control(self, command: str = "status", timeout: float = 5.0) -> dict:
        """One command on the control socket (cheaper than `preforkd status`)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.workdir / "run" / "preforkd.sock"))
            s.sendall(command.encode() + b"\n")
            buf = b""
            while chunk := s.recv(65536):
                buf += chunk
        return json.loads(buf)

    def pool(self) -> dict:
        """The first service's pool counts: busy, idle, starting, current, connections ..."""
        return self.control()["services"][0]["pool"]

    def worker_pids(self) -> list[int]:
        out = subprocess.run([str(PREFORKD), "status", "--json", "-c", str(self.config)],
                             capture_output=True, text=True, timeout=20)
        st = json.loads(out.stdout)
        return [w["pid"] for s in st["services"] for w in s["workers"]]


class PreforkdAccessPeer(PreforkdPeer):
    """preforkd as above with its access log on (`[log] access = true`, events to a file in
    the work directory, one `connection.closed` line per connection): W1 against the plain
    preforkd peer, in the same run, is what the access log costs. Its events go to the
    file, so the port is read from `status --json`."""

    name, label = "preforkd-access", "preforkd, access log on"
    _stderr_tail = Peer._stderr_tail  # its stderr is the file Peer._spawn writes

    def __init__(self, workdir: Path, workers: int = 4) -> None:
        super().__init__(workdir, workers)
        self.workdir = workdir / f"preforkd-access-{workers}"

    def start(self) -> None:
        if not PREFORKD.exists():
            raise PeerFailed(f"{PREFORKD.relative_to(ROOT)} not found (make venv)")
        self.config = write_preforkd_config(self.workdir, self.workers)
        self.config.write_text(self.config.read_text().replace(
            'level = "info"\n', 'level = "info"\naccess = true\nfile = "access.log"\n'))
        self._spawn([str(PREFORKD), "run", "-c", str(self.config)], False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not self.port:
            out = subprocess.run([str(PREFORKD), "status", "--json", "-c", str(self.config)],
                                 capture_output=True, text=True, timeout=20)
            with contextlib.suppress(ValueError, KeyError, IndexError):
                st = json.loads(out.stdout)
                if st.get("state") == "running":
                    self.port = int(st["services"][0]["listeners"][0]["address"].rsplit(":", 1)[1])
            if not self.port:
                if not self.alive():
                    raise PeerFailed(f"exited during start-up{self._stderr_tail()}")
                time.sleep(0.1)
        if not self.port:
            raise PeerFailed("not running after 20 s")
        self.wait_ready()


class PreforkdDynamicPeer(PreforkdPeer):
    """A dynamic pool: 4 workers at start, up to 64 (issue 8)."""

    name, label = "preforkd-dynamic", "preforkd dynamic (4–64 workers)"
    service_keys: ClassVar[dict] = {"max_workers": 64}

    def version(self) -> str:
        return "the preforkd above, " + ", ".join(f"`{k} = {v}`" for k, v in self.service_keys.items())


class PreforkdEventPeer(PreforkdPeer):
    """Event-driven workers on asyncio's own loop: 4 workers of 1,000 connections each (issue 8)."""

    name, label = "preforkd-event", "preforkd event (asyncio, 4 × 1,000)"
    service_keys: ClassVar[dict] = {"worker_connections": 1000}
    supervisor_keys: ClassVar[dict] = {"event_loop": "asyncio"}

    def version(self) -> str:
        return f"the preforkd above, `worker_connections = 1000`, asyncio of Python {platform.python_version()}"


class PreforkdUvloopPeer(PreforkdEventPeer):
    """The same on uvloop."""

    name, label = "preforkd-uvloop", "preforkd event (uvloop, 4 × 1,000)"
    supervisor_keys: ClassVar[dict] = {"event_loop": "uvloop"}

    def version(self) -> str:
        try:
            out = subprocess.run([str(PY), "-c", "import uvloop; print(uvloop.__version__)"],
                                 capture_output=True, text=True, timeout=20)
            v = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            v = ""
        return (f"the preforkd above, `worker_connections = 1000`, uvloop {v}" if v
                else "uvloop not installed (run benchmarks/setup.sh)")


PREFORKD_VARIANTS = [PreforkdDynamicPeer, PreforkdEventPeer, PreforkdUvloopPeer]
PEER_CLASSES = [PreforkdPeer, *PREFORKD_VARIANTS, PreforkdAccessPeer, NaivePeer, ForkingPeer, AsyncioPeer,
                NetServerPeer, RedisPeer]


def is_preforkd(name: str) -> bool:
    return name == "preforkd" or name.startswith("preforkd-")


# ---------------------------------------------------------------- load generator

def loadgen_cmd(mode: str, port: int, conc: int, duration: float, timeout_ms: int = 0) -> list[str]:
    argv = [str(LOADGEN), "-m", mode, "-p", str(port), "-c", str(conc), "-d", f"{duration:g}"]
    if mode == "short":
        # spread short connections over 64 loopback source addresses: the client's
        # ephemeral-port search among TIME_WAIT sockets otherwise costs more than the server
        argv += ["-S", "64"]
    if timeout_ms:
        argv += ["-T", str(timeout_ms)]
    return argv


def run_loadgen(argv: list[str], duration: float) -> dict:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen exited {out.returncode}: {out.stderr.strip()[:300]}")
    return json.loads(out.stdout)


def measure_cell(peer: Peer, mode: str, conc: int, duration: float) -> dict:
    argv = loadgen_cmd(mode, peer.port, conc, duration)
    root = peer.root()
    m0 = machine_cpu()
    c0 = tree_cpu(root)
    res = run_loadgen(argv, duration)
    c1 = tree_cpu(root)
    m1 = machine_cpu()
    server_cpu = c1 - c0
    ok = res["ok"]
    client_cpu = res["cpu_user_s"] + res["cpu_sys_s"]
    # CPU that neither the server nor the client used: other processes on the machine
    foreign = (m1[2] - m0[2]) / CLK_TCK - server_cpu - client_cpu
    return {
        "rate": res["rate"],
        "ok": ok,
        "cpu_per_op_us": server_cpu / ok * 1e6 if ok else float("nan"),
        "server_cpu_util": server_cpu / res["elapsed_s"],
        "p50_us": res["p50_us"],
        "p99_us": res["p99_us"],
        "errors": res["errors"],
        "refused": res["refused"],
        "reset": res["reset"],
        "wrong": res["wrong"],
        "other": res["other"] + res["timeout"],
        "starved": res["starved"],
        # persistent: the connection that waited longest for its first reply (connect -> reply)
        "first_max_ms": res.get("first_max_us", float("nan")) / 1000 if mode == "persistent" else float("nan"),
        "loadgen_cpu_util": res["cpu_util"],
        "loadgen_cpu_per_op_us": (res["cpu_user_s"] + res["cpu_sys_s"]) / ok * 1e6 if ok else float("nan"),
        "machine_busy": (m1[0] - m0[0]) / max(1, m1[1] - m0[1]),
        "foreign_cores": max(0.0, foreign / res["elapsed_s"]),
    }


# ---------------------------------------------------------------- workloads

NOISE_CORES = 0.15  # CPU (in cores) used by other processes above which a cell is re-measured

CELLS = [  # (key, workload, mode, concurrency)
    ("W1-4", "W1", "short", 4),
    ("W1-32", "W1", "short", 32),
    ("W2-4", "W2", "persistent", 4),
    ("W2-32", "W2", "persistent", 32),
    ("W2-1000", "W2", "persistent", 1000),  # issue 8: event-driven workers
]
#: (cell, peer) pairs not measured, and why (shown in the table)
NOT_RUN = {("W2-1000", "forking"): "not run: a fork per connection, 1,000 processes per cell"}


def wait_for_quiet(limit: float = 60.0) -> float:
    """Wait (up to limit s) until processes other than ours use < NOISE_CORES; return
    the last reading in cores."""
    deadline = time.monotonic() + limit
    me = psutil.Process()
    warned = False
    while True:
        m0, c0 = machine_cpu(), tree_cpu(me)
        time.sleep(1.0)
        m1, c1 = machine_cpu(), tree_cpu(me)
        other = max(0.0, (m1[2] - m0[2]) / CLK_TCK - (c1 - c0))
        if other < NOISE_CORES or time.monotonic() >= deadline:
            if warned or other >= NOISE_CORES:
                log(f"other processes use {other:.2f} cores; going on")
            return other
        if not warned:
            log(f"other processes use {other:.2f} cores; waiting up to {limit:.0f} s for the machine to quieten")
            warned = True


def run_w1_w2(peers: list[Peer], runs: int, duration: float, retry_budget: float,
              cells: list | None = None) -> dict:
    """results[cell][peer] = list of per-run dicts. Peers are interleaved (and their order
    rotated) inside every run so that drift on the machine hits them all alike."""
    cells = CELLS if cells is None else cells
    results: dict = {key: {p.name: [] for p in peers} for key, *_ in cells}
    retry_deadline = [float("inf")]
    log("warm-up: 0.5 s short + 0.5 s persistent per peer")
    for p in peers:
        if p.error:
            continue
        try:
            run_loadgen(loadgen_cmd("short", p.port, 4, 0.5), 0.5)
            run_loadgen(loadgen_cmd("persistent", p.port, 4, 0.5), 0.5)
        except Exception as e:  # noqa: BLE001
            p.error = f"warm-up failed: {e}"
    wait_for_quiet()
    expected = runs * len(cells) * sum(1 for p in peers if not p.error) * (duration + 0.6)
    retry_deadline[0] = time.monotonic() + expected + retry_budget
    for r in range(runs):
        for key, _wl, mode, conc in cells:
            order = peers[r % len(peers):] + peers[:r % len(peers)]
            for p in order:
                if p.error or (key, p.name) in NOT_RUN:
                    continue
                if not p.alive():
                    p.error = f"died before {key} run {r + 1}"
                    log(f"  {p.name}: {p.error}")
                    continue
                try:
                    cell = measure_cell(p, mode, conc, duration)
                    # another process on the machine took CPU during the cell (a test suite,
                    # a build): measure again, up to twice, and keep the quietest attempt
                    tries = 1
                    while (cell["foreign_cores"] > NOISE_CORES and tries < 3
                           and time.monotonic() < retry_deadline[0]):
                        log(f"  {key} {p.name}: other processes used {cell['foreign_cores']:.2f} cores "
                            f"during the cell; measuring again")
                        time.sleep(2)
                        again = measure_cell(p, mode, conc, duration)
                        tries += 1
                        if again["foreign_cores"] < cell["foreign_cores"]:
                            cell = again
                    cell["attempts"] = tries
                except Exception as e:  # noqa: BLE001
                    p.error = f"{key} run {r + 1}: {e}"
                    log(f"  {p.name}: FAILED {p.error}")
                    continue
                results[key][p.name].append(cell)
                log(f"run {r + 1}/{runs} {key:6} {p.name:10} {cell['rate']:9.0f}/s "
                    f"cpu {cell['cpu_per_op_us']:7.1f} us/op  p50 {cell['p50_us']:7.0f} p99 {cell['p99_us']:7.0f} us  "
                    f"err {cell['errors']} starved {cell['starved']}  loadgen {cell['loadgen_cpu_util']:.0%} "
                    f"server {cell['server_cpu_util']:.0%} machine {cell['machine_busy']:.0%} "
                    f"others {cell['foreign_cores']:.2f}")
                time.sleep(0.3)
    # A run during which other processes took CPU is dropped from the summary when at
    # least 3 quiet runs of the same cell and peer remain; it is kept (and counted) otherwise.
    for key in results:
        for name, rs in results[key].items():
            quiet = [x for x in rs if x["foreign_cores"] <= NOISE_CORES]
            if len(quiet) >= 3 and len(quiet) < len(rs):
                for x in rs:
                    x["excluded"] = x["foreign_cores"] > NOISE_CORES
                results[key][name] = quiet
                DROPPED.setdefault(key, {})[name] = len(rs) - len(quiet)
    return results


DROPPED: dict = {}


def run_w3(workdir: Path, hups: int, settle: float) -> dict:
    """20 HUPs while short (4 clients) and persistent (2 connections) load runs."""
    peer = PreforkdPeer(workdir / "w3")
    out: dict = {"hups": hups}
    lg_procs: list[subprocess.Popen] = []
    try:
        peer.start()
        out["command"] = peer.command
        out["port"] = peer.port
        root = peer.root()
        pid0 = root.pid
        long_d = 600.0
        short_argv = loadgen_cmd("short", peer.port, 4, long_d, timeout_ms=2000)
        pers_argv = loadgen_cmd("persistent", peer.port, 2, long_d, timeout_ms=2000)
        out["loadgen"] = [" ".join(short_argv), " ".join(pers_argv)]
        for argv in (short_argv, pers_argv):
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            REAPER.track(p.pid)
            lg_procs.append(p)
        time.sleep(0.5)
        peer.drain_events()
        internal, external, gens, errors = [], [], [], []
        phases: dict[str, list[float]] = {}
        all_events: list[dict] = []
        for i in range(hups):
            all_events += peer.drain_events()
            t0 = time.monotonic()
            os.kill(pid0, signal.SIGHUP)
            seen: list[dict] = []
            try:
                ev = peer.wait_event("config.reloaded", 15.0, collect=seen)
            except PeerFailed as e:
                errors.append(f"HUP {i + 1}: {e}")
                all_events += seen
                break
            all_events += seen
            # where the time goes: each event's first appearance, ms after the HUP was sent
            # (harness clock: when the line was read)
            firsts: dict[str, float] = {}
            for e in seen:
                if e["_t"] < t0:
                    continue
                nm = str(e.get("event"))
                if nm == "listener.bound":
                    nm += f" ({e.get('origin', '?')})"
                firsts.setdefault(nm, (e["_t"] - t0) * 1000)
            for nm, v in firsts.items():
                phases.setdefault(nm, []).append(v)
            external.append((ev["_t"] - t0) * 1000)
            if "duration_ms" in ev:
                internal.append(float(ev["duration_ms"]))
            gens.append(ev.get("generation"))
            if i % 5 == 4:
                log(f"  W3: {i + 1}/{hups} HUPs, last {external[-1]:.0f} ms (generation {gens[-1]})")
            time.sleep(settle)
        time.sleep(0.5)
        lg_results = []
        for p in lg_procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in lg_procs:
            stdout, stderr = p.communicate(timeout=30)
            lg_results.append(json.loads(stdout) if stdout.strip() else {"error": stderr})
            for tp in list(REAPER.procs):
                if tp.pid == p.pid:
                    REAPER.procs.remove(tp)
        lg_procs = []
        events = all_events + peer.drain_events()
        out.update({
            "phases_ms": phases,
            "reloads": len(external),
            "internal_ms": internal,
            "external_ms": external,
            "generations": gens,
            "same_pid": root.is_running() and root.pid == pid0,
            "errors": errors,
            "short": lg_results[0],
            "persistent": lg_results[1],
            "failed": sum(r.get("errors", 0) for r in lg_results),
            "reload_failed_events": sum(1 for e in events if e.get("event") == "config.reload_failed"),
            "exit_events": [e for e in events if e.get("event") == "worker.exited"
                            and (e.get("signal") or e.get("exit_code") not in (0, None))][:5],
        })
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
        log(f"  W3 failed: {out['error']}")
    finally:
        for p in lg_procs:
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(timeout=5)
        peer.stop()
    return out


def run_w4(workdir: Path, warm: float) -> dict:
    """USS/RSS/PSS per worker with 16 workers after a warm-up, and the master's."""
    out: dict = {}
    for cls in (PreforkdPeer, NaivePeer, NetServerPeer):
        peer = cls(workdir / "w4", workers=16) if cls is not NetServerPeer else None
        if cls is NetServerPeer:
            peer = NetServer16(workdir / "w4")
        res: dict = {}
        try:
            (workdir / "w4").mkdir(parents=True, exist_ok=True)
            peer.start()
            res["command"] = peer.command
            run_loadgen(loadgen_cmd("short", peer.port, 16, warm), warm)
            run_loadgen(loadgen_cmd("persistent", peer.port, 16, warm), warm)
            time.sleep(0.3)
            root = peer.root()
            kids = root.children(recursive=False)
            mem = []
            for k in kids:
                with contextlib.suppress(psutil.NoSuchProcess):
                    mi = k.memory_full_info()
                    mem.append({"pid": k.pid, "uss": mi.uss, "rss": mi.rss, "pss": mi.pss})
            mi = root.memory_full_info()
            res.update({
                "workers": len(mem),
                "worker_uss": [m["uss"] for m in mem],
                "worker_rss": [m["rss"] for m in mem],
                "worker_pss": [m["pss"] for m in mem],
                "master_uss": mi.uss, "master_rss": mi.rss, "master_pss": mi.pss,
            })
            uss, rss = statistics.median(res["worker_uss"]) / 2**20, statistics.median(res["worker_rss"]) / 2**20
            log(f"  W4 {peer.name}: {len(mem)} workers, USS median {uss:.2f} MiB, "
                f"RSS median {rss:.2f} MiB; master USS {mi.uss / 2**20:.2f} MiB")
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {e}"
            log(f"  W4 {peer.name} failed: {res['error']}")
        finally:
            peer.stop()
        out[peer.name] = res
    return out


class NetServer16(NetServerPeer):
    def start(self) -> None:
        self._spawn(["perl", str(BENCH / "netserver_prefork.pl"), "0", "16"], True)
        self.wait_ready()


def run_w5(workdir: Path, repeats: int) -> dict:
    """`preforkd start` (daemonize, returns once ready) to the first reply; the naive
    pre-fork's process start to first reply as the reference."""
    out: dict = {"preforkd": {}, "naive": {}}
    d = workdir / "w5"
    res = out["preforkd"]
    start_ms, first_ms = [], []
    try:
        if not PREFORKD.exists():
            raise PeerFailed("preforkd not installed")
        for _i in range(repeats):
            port = free_port()
            cfg = write_preforkd_config(d, 4, port=port, logfile=str(d / "preforkd.log"))
            res["command"] = f"{PREFORKD} start -c {cfg}"
            t0 = time.monotonic()
            r = subprocess.run([str(PREFORKD), "start", "-c", str(cfg)], capture_output=True, text=True,
                               timeout=60, cwd=d)
            t1 = time.monotonic()
            pid = _pid_from(d / "run" / "preforkd.pid")
            if pid:
                REAPER.track(pid)
            if r.returncode != 0:
                raise PeerFailed(f"preforkd start exited {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
            ok = ping(port, timeout=5)
            t2 = time.monotonic()
            if not ok:
                raise PeerFailed("no +PONG right after `preforkd start` returned")
            start_ms.append((t1 - t0) * 1000)
            first_ms.append((t2 - t0) * 1000)
            s = subprocess.run([str(PREFORKD), "stop", "-c", str(cfg)], capture_output=True, text=True,
                               timeout=60, cwd=d)
            if pid:
                try:
                    p = psutil.Process(pid)
                    p.wait(timeout=15)
                except psutil.NoSuchProcess:
                    pass
                except psutil.TimeoutExpired:
                    raise PeerFailed(f"`preforkd stop` exited {s.returncode} but pid {pid} still runs") from None
                for tp in list(REAPER.procs):
                    if tp.pid == pid:
                        REAPER.procs.remove(tp)
            if s.returncode != 0:
                raise PeerFailed(f"preforkd stop exited {s.returncode}: {(s.stderr or s.stdout).strip()[-300:]}")
        res.update({"start_ms": start_ms, "first_reply_ms": first_ms})
        log(f"  W5 preforkd: start returned {statistics.median(start_ms):.0f} ms, first reply "
            f"{statistics.median(first_ms):.0f} ms (median of {repeats})")
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"
        res.update({"start_ms": start_ms, "first_reply_ms": first_ms})
        log(f"  W5 preforkd failed: {res['error']}")
    # reference: the naive pre-fork, process start to first reply (polling)
    res = out["naive"]
    firsts = []
    try:
        for _i in range(repeats):
            peer = NaivePeer(d)
            t0 = time.monotonic()
            try:
                peer._spawn([str(PY), str(BENCH / "naive_prefork.py")], True)
                while not ping(peer.port, timeout=1):
                    if time.monotonic() - t0 > 15:
                        raise PeerFailed("no reply in 15 s")
                    time.sleep(0.001)
                firsts.append((time.monotonic() - t0) * 1000)
                res["command"] = peer.command
            finally:
                peer.stop()
        res["first_reply_ms"] = firsts
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"
    return out


# ---------------------------------------------------------------- issue 8: capacity workloads
#
# W6 slow clients, W7 idle capacity, W8 new worker. They hold connections open with the
# load generator's holding modes (hold, silent, trickle) while they measure.

class Holder:
    """A load generator holding connections open in the background (`-m hold|silent|trickle`):
    started, waited on until every connection is open (its `ready` line), then stopped with
    SIGTERM for its report (how many it held, how many the server closed)."""

    def __init__(self, mode: str, port: int, conc: int, *, ramp: int = 64, sources: int = 1,
                 interval_ms: float = 100.0, duration: float = 600.0) -> None:
        self.argv = [str(LOADGEN), "-m", mode, "-p", str(port), "-c", str(conc), "-d", f"{duration:g}",
                     "-R", str(ramp)]
        if sources > 1:
            self.argv += ["-S", str(sources)]
        if mode == "trickle":
            self.argv += ["-i", f"{interval_ms:g}"]
        self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        REAPER.track(self.popen.pid)
        self.ready: dict | None = None

    def wait_ready(self, timeout: float) -> dict | None:
        """The `ready` line (every connection open), or None after *timeout* seconds."""
        assert self.popen.stdout is not None
        line = _readline_timeout(self.popen.stdout, timeout)
        with contextlib.suppress(ValueError):
            self.ready = json.loads(line) if line.endswith("\n") else None
        return self.ready

    def finish(self) -> dict:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)
        try:
            out, err = self.popen.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            out, err = self.popen.communicate()
        _untrack(self.popen.pid)
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
        try:
            return json.loads(lines[-1])
        except (IndexError, ValueError):
            return {"error": err.decode(errors="replace").strip()[-300:] or "no report"}


def _untrack(pid: int) -> None:
    for tp in list(REAPER.procs):
        if tp.pid == pid:
            REAPER.procs.remove(tp)


def finish_all(holders: list[Holder]) -> list[dict]:
    out = []
    for h in holders:
        try:
            out.append(h.finish())
        except Exception as e:  # noqa: BLE001
            out.append({"error": f"{type(e).__name__}: {e}"})
    holders.clear()
    return out


#: (cell, silent connections, trickling connections) held while fresh clients are measured
SLOW_CELLS = [("W6-4", 4, 0), ("W6-400", 200, 200)]
SLOW_TIMEOUT_MS = 1000  # a fresh client not answered within this counts as failed
TRICKLE_MS = 100  # a trickling client sends one byte ('x', never a line end) this often
FRESH_CLIENTS = 4


def slow_cell(peer: Peer, silent: int, trickle: int, duration: float) -> dict:
    """Hold *silent* silent and *trickle* trickling connections, then measure fresh short
    connections (4 clients, 1 s timeout) for *duration* seconds."""
    holders: list[Holder] = []
    cell: dict = {}
    try:
        for mode, n in (("silent", silent), ("trickle", trickle)):
            if n:
                h = Holder(mode, peer.port, n, ramp=64, interval_ms=TRICKLE_MS)
                holders.append(h)
                rd = h.wait_ready(20.0)
                cell[f"{mode}_open"] = rd["opened"] if rd else 0
        time.sleep(0.3)  # the server accepts them (or queues them)
        res = run_loadgen(loadgen_cmd("short", peer.port, FRESH_CLIENTS, duration, timeout_ms=SLOW_TIMEOUT_MS),
                          duration)
    finally:
        finals = finish_all(holders)
    # failed: errors and time-outs, and the attempts still unanswered after 1 s when the cell ended
    failed = res["errors"] + res["stalled_end"]
    attempts = res["ok"] + failed
    cell.update({
        "rate": res["rate"], "ok": res["ok"], "failed": failed, "timeout": res["timeout"],
        "attempts": attempts, "p50_us": res["p50_us"] if res["ok"] else float("inf"),
        "p99_ok_us": res["p99_us"] if res["ok"] else float("nan"), "max_us": res["max_us"],
        # p99 over every attempt, a failed one counting as infinitely slow
        "p99_us": res["p99_us"] if res["ok"] and failed <= 0.01 * attempts else float("inf"),
        "closed": sum(f.get("closed", 0) for f in finals),
        "held_end": sum(f.get("held_end", 0) for f in finals),
    })
    return cell


def run_w6(peers: list[Peer], runs: int, duration: float) -> dict:
    """results[cell][peer] = per-run dicts; peers interleaved and rotated as in W1/W2."""
    results: dict = {key: {p.name: [] for p in peers} for key, *_ in SLOW_CELLS}
    for r in range(runs):
        for key, silent, trickle in SLOW_CELLS:
            order = peers[r % len(peers):] + peers[:r % len(peers)]
            for p in order:
                if p.error:
                    continue
                if not p.alive():
                    p.error = f"died before {key} run {r + 1}"
                    continue
                try:
                    cell = slow_cell(p, silent, trickle, duration)
                except Exception as e:  # noqa: BLE001
                    log(f"  {key} {p.name}: FAILED {type(e).__name__}: {e}")
                    continue
                results[key][p.name].append(cell)
                log(f"run {r + 1}/{runs} {key:6} {p.name:16} fresh {cell['rate']:7.0f}/s ok {cell['ok']} "
                    f"failed {cell['failed']}  p50 {cell['p50_us'] / 1000:6.1f} p99 {cell['p99_us'] / 1000:6.1f} ms  "
                    f"held {cell['held_end']} closed {cell['closed']}")
                time.sleep(0.3)  # a fixed pool drains the dead connections queued meanwhile
    return results


IDLE_CONNECTIONS = 10_000
IDLE_WORKER_CONNECTIONS = 5_000  # 4 workers of 5,000: room for 10,000 however unevenly they spread


class PreforkdIdlePeer(PreforkdEventPeer):
    name, label = "preforkd-event", "preforkd event (asyncio, 4 × 5,000)"
    service_keys: ClassVar[dict] = {"worker_connections": IDLE_WORKER_CONNECTIONS}


class PreforkdIdleUvloopPeer(PreforkdUvloopPeer):
    name, label = "preforkd-uvloop", "preforkd event (uvloop, 4 × 5,000)"
    service_keys: ClassVar[dict] = {"worker_connections": IDLE_WORKER_CONNECTIONS}


class RedisIdlePeer(RedisPeer):
    extra_args: ClassVar[list[str]] = ["--maxclients", str(IDLE_CONNECTIONS + 100)]  # default 10,000


def server_processes(peer: Peer) -> list[psutil.Process]:
    """The processes that hold the connections: a pre-fork server's workers (the direct
    children of its master), else the server process itself."""
    root = peer.root()
    return root.children(recursive=False) if isinstance(peer, PreforkdPeer) else [root]


def memory(procs: list[psutil.Process]) -> dict:
    uss = rss = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            mi = p.memory_full_info()
            uss += mi.uss
            rss += mi.rss
    return {"uss": uss, "rss": rss, "processes": len(procs)}


def run_w7(workdir: Path, n: int, warm: float, wanted: set[str] | None) -> dict:
    """n idle connections (each sent one PING and got its +PONG, then silent) held by 4
    event-driven workers; memory per idle connection from the growth of the workers' USS
    and RSS; asyncio (1 process) and redis as references."""
    out: dict = {}
    for cls in (PreforkdIdlePeer, PreforkdIdleUvloopPeer, AsyncioPeer, RedisIdlePeer):
        if wanted is not None and cls.name not in wanted:
            continue
        peer = cls(workdir / "w7")
        res: dict = {"label": peer.label}
        holders: list[Holder] = []
        try:
            (workdir / "w7").mkdir(parents=True, exist_ok=True)
            peer.start()
            res["command"] = peer.command
            run_loadgen(loadgen_cmd("short", peer.port, 16, warm), warm)
            run_loadgen(loadgen_cmd("persistent", peer.port, 16, warm), warm)
            time.sleep(0.3)
            before = memory(server_processes(peer))
            t0 = time.monotonic()
            h = Holder("hold", peer.port, n, ramp=500, sources=16)
            holders.append(h)
            rd = h.wait_ready(120.0)
            res["open_s"] = time.monotonic() - t0
            time.sleep(1.0)
            after = memory(server_processes(peer))
            if isinstance(peer, PreforkdPeer):
                with contextlib.suppress(Exception):
                    st = peer.control()["services"][0]
                    res["per_worker"] = sorted((w["active"] for w in st["workers"]), reverse=True)
            probe = run_loadgen(loadgen_cmd("short", peer.port, FRESH_CLIENTS, 1.0, timeout_ms=SLOW_TIMEOUT_MS), 1.0)
            final = finish_all(holders)[0]
            held = final.get("held_end", 0)
            res.update({
                "held": held, "opened": (rd or {}).get("opened", final.get("opened", 0)), "ready": rd is not None,
                "closed": final.get("closed", 0), "errors": final.get("errors", 0),
                "before": before, "after": after,
                "uss_per_conn": (after["uss"] - before["uss"]) / held if held else float("nan"),
                "rss_per_conn": (after["rss"] - before["rss"]) / held if held else float("nan"),
                "probe_rate": probe["rate"], "probe_p99_us": probe["p99_us"], "probe_failed": probe["errors"],
            })
            log(f"  W7 {peer.name}: {held} of {n} held (opened in {res['open_s']:.1f} s), "
                f"USS {res['uss_per_conn'] / 1024:.2f} KiB/conn, RSS {res['rss_per_conn'] / 1024:.2f} KiB/conn; "
                f"fresh clients meanwhile {probe['rate']:.0f}/s p99 {probe['p99_us'] / 1000:.1f} ms")
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {e}"
            log(f"  W7 {peer.name} failed: {res['error']}")
        finally:
            finish_all(holders)
            peer.stop()
        out[cls.name] = res
    return out


def settle(peer: PreforkdPeer, timeout: float = 10.0) -> dict:
    """Wait until a dynamic pool has no worker starting and at least one idle."""
    deadline = time.monotonic() + timeout
    while True:
        pool = peer.pool()
        if (pool["starting"] == 0 and pool["idle"] >= 1 and pool["current"] == pool["target"]) \
                or time.monotonic() > deadline:
            return pool
        time.sleep(0.02)


def run_w8(workdir: Path, repeats: int) -> dict:
    """The time from a connection that needs a new worker to its first reply. A dynamic
    pool (workers = 4, max_workers = 64, min_spare_workers = 1) is settled with every worker
    busy but its one spare; then one client more than there are idle workers connects at
    once (each sends PING and holds the connection): the spare takes one, the last needs a
    new worker. Its connect() → +PONG is one sample; the held connections stay, so each
    repeat starts from a bigger pool."""
    peer = PreforkdDynamicPeer(workdir / "w8")
    out: dict = {"repeats": repeats}
    holders: list[Holder] = []
    new_ms: list[float] = []
    spare_ms: list[float] = []
    try:
        peer.start()
        out["command"] = peer.command
        pool = settle(peer)
        if pool["idle"] > 1:  # hold all but one worker busy
            h = Holder("hold", peer.port, pool["idle"] - 1, ramp=0)
            holders.append(h)
            if not h.wait_ready(10.0):
                raise PeerFailed("the first connections got no reply")
        for _i in range(repeats):
            pool = settle(peer)
            h = Holder("hold", peer.port, pool["idle"] + 1, ramp=0)
            holders.append(h)
            rd = h.wait_ready(10.0)
            if not rd:
                raise PeerFailed(f"no reply within 10 s with {pool['current']} workers")
            new_ms.append(rd["first_max_us"] / 1000)
            spare_ms.append(rd["first_min_us"] / 1000)
        out["pool_end"] = settle(peer)
        out["held"] = sum((h.ready or {}).get("opened", 0) for h in holders)
        log(f"  W8: connection needing a new worker -> first reply: median {med(new_ms):.1f} ms "
            f"(min {min(new_ms):.1f}, max {max(new_ms):.1f}); served by a spare: {med(spare_ms):.2f} ms; "
            f"pool ended at {out['pool_end']['current']} workers")
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
        log(f"  W8 failed: {out['error']}")
    finally:
        finish_all(holders)
        peer.stop()
    out.update({"new_worker_ms": new_ms, "spare_ms": spare_ms})
    return out


def _pid_from(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().split()[0])
    return None


# ---------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def spread(xs):
    xs = [x for x in xs if x == x]
    return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))


def fmt(x, nd=0):
    if x != x:
        return "–"
    return f"{x:,.{nd}f}"


def fmt_spread(xs, nd=0):
    lo, hi = spread(xs)
    if lo != lo:
        return "–"
    return f"{fmt(med(xs), nd)} ({fmt(lo, nd)}–{fmt(hi, nd)})"


def ratio(a, b, nd=2):
    if a != a or b != b or not b:
        return "–"
    return f"{a / b:.{nd}f}×"


def machine_info() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total
    distro = ""
    with contextlib.suppress(OSError):
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip().strip('"')
    gcc = ""
    with contextlib.suppress(Exception):
        gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem / 2**30,
        "kernel": platform.release(), "os": distro, "python": platform.python_version(),
        "gcc": gcc,
    }


TARGET_DEFS = """\
W1 connections/s ≥ 0.95× naive; server CPU per connection ≤ 1.3× naive; ≥ 10× ForkingTCPServer;
≥ Net::Server::PreFork. W2 replies/s ≥ 0.8× naive at 4 connections; CPU per reply ≤ 1.3× naive.
W3 0 failed connections; HUP → new generation accepting < 250 ms at the median. W4 worker USS ≤ 3 MiB."""


def targets(results: dict, w3: dict, w4: dict) -> list[tuple[str, str, str, str]]:
    """(target, measured, verdict, margin) rows."""
    rows = []

    def m(cell, peer, key):
        return med([r[key] for r in results.get(cell, {}).get(peer, [])])

    def check(label, value, limit, kind, fmtv):
        if value != value or limit != limit:
            rows.append((label, "–", "not measured", ""))
            return
        ok = value >= limit if kind == ">=" else value <= limit
        margin = (value / limit - 1) * 100 if limit else float("nan")
        rows.append((label, fmtv(value), "met" if ok else "**missed**", f"{margin:+.0f}% vs the limit"))

    for c in ("W1-4", "W1-32"):
        n = c.split("-")[1]
        pr, nr = m(c, "preforkd", "rate"), m(c, BASELINE, "rate")
        check(f"{c}: conn/s ≥ 0.95× naive ({n} clients)", pr / nr if nr else float("nan"), 0.95, ">=",
              lambda v: f"{v:.2f}×")
        pc, nc = m(c, "preforkd", "cpu_per_op_us"), m(c, BASELINE, "cpu_per_op_us")
        check(f"{c}: CPU/conn ≤ 1.3× naive ({n} clients)", pc / nc if nc else float("nan"), 1.3, "<=",
              lambda v: f"{v:.2f}×")
        fr = m(c, "forking", "rate")
        check(f"{c}: conn/s ≥ 10× ForkingTCPServer ({n} clients)", pr / fr if fr else float("nan"), 10, ">=",
              lambda v: f"{v:.1f}×")
        ns = m(c, "netserver", "rate")
        check(f"{c}: conn/s ≥ Net::Server::PreFork ({n} clients)", pr / ns if ns else float("nan"), 1.0, ">=",
              lambda v: f"{v:.2f}×")
    pr, nr = m("W2-4", "preforkd", "rate"), m("W2-4", BASELINE, "rate")
    check("W2-4: replies/s ≥ 0.8× naive (4 connections)", pr / nr if nr else float("nan"), 0.8, ">=",
          lambda v: f"{v:.2f}×")
    for c in ("W2-4", "W2-32"):
        pc, nc = m(c, "preforkd", "cpu_per_op_us"), m(c, BASELINE, "cpu_per_op_us")
        check(f"{c}: CPU/reply ≤ 1.3× naive ({c.split('-')[1]} connections)",
              pc / nc if nc else float("nan"), 1.3, "<=", lambda v: f"{v:.2f}×")
    if w3 and "failed" in w3:
        check("W3: failed connections = 0", float(w3["failed"]), 0.0, "<=", lambda v: f"{v:.0f}")
        rows[-1] = rows[-1][:3] + ("",)
        check("W3: HUP → new generation accepting, median < 250 ms (preforkd's duration_ms)",
              med(w3.get("internal_ms", [])), 250.0, "<=", lambda v: f"{v:.0f} ms")
        check("W3: same, measured from the HUP to the log line", med(w3.get("external_ms", [])), 250.0, "<=",
              lambda v: f"{v:.0f} ms")
    else:
        rows.append(("W3", "–", "not measured", w3.get("error", "") if w3 else ""))
    p4 = (w4 or {}).get("preforkd", {})
    if p4.get("worker_uss"):
        check("W4: worker USS ≤ 3 MiB (median of 16)", statistics.median(p4["worker_uss"]) / 2**20, 3.0, "<=",
              lambda v: f"{v:.2f} MiB")
        check("W4: worker USS ≤ 3 MiB (largest of 16)", max(p4["worker_uss"]) / 2**20, 3.0, "<=",
              lambda v: f"{v:.2f} MiB")
    else:
        rows.append(("W4: worker USS ≤ 3 MiB", "–", "not measured", p4.get("error", "")))
    return rows


# ---------------------------------------------------------------- report: issue 8 (capacity)

TARGET_DEFS_8 = """\
Dynamic pool: W2-32 serves all 32 connections at ≥ 0.8× the naive pre-fork's W2-4 rate. Event-driven workers
(asyncio and uvloop each): W2-32 ≥ 1.0× the naive W2-4 rate with CPU per reply ≤ 1.2× the naive's (W2-4);
W2-1000 serves all 1,000; W1-4 ≥ 0.9× naive. W6: fresh clients under 200 silent and 200 trickling connections
answered with p99 < 50 ms (event mode). W7: 10,000 idle connections held at ≤ 16 KiB each. W8: a connection
that needs a new worker gets its first reply in < 100 ms at the median."""

EVENT_PEERS = ("preforkd-event", "preforkd-uvloop")


def _check(rows: list, label: str, value: float, limit: float, kind: str, fmtv, note: str = "") -> None:
    if value != value or limit != limit:
        rows.append((label, "–", "not measured", note))
        return
    ok = value >= limit if kind == ">=" else value <= limit
    if value == float("inf"):
        margin = note or "no answer"
    elif not limit:
        margin = note
    else:
        margin = f"{(value / limit - 1) * 100:+.0f}% vs the limit" + (f"; {note}" if note else "")
    rows.append((label, fmtv(value), "met" if ok else "**missed**", margin))


def capacity_targets(results: dict, cap: dict) -> list[tuple[str, str, str, str]]:
    rows: list = []

    def m(cell, peer, key):
        return med([r[key] for r in results.get(cell, {}).get(peer, [])])

    def worst(cell, peer, key):
        xs = [r[key] for r in results.get(cell, {}).get(peer, [])]
        return max(xs) if xs else float("nan")

    x = lambda v: f"{v:.2f}×"  # noqa: E731
    n2 = m("W2-4", BASELINE, "rate")
    c2 = m("W2-4", BASELINE, "cpu_per_op_us")
    _check(rows, "dynamic W2-32: connections with no reply = 0 (worst run)", worst("W2-32", "preforkd-dynamic",
           "starved"), 0, "<=", lambda v: f"{v:.0f} of 32")
    _check(rows, "dynamic W2-32: replies/s ≥ 0.8× naive W2-4", m("W2-32", "preforkd-dynamic", "rate") / n2, 0.8,
           ">=", x)
    for name in EVENT_PEERS:
        loop = "uvloop" if "uvloop" in name else "asyncio"
        _check(rows, f"event ({loop}) W2-32: replies/s ≥ 1.0× naive W2-4", m("W2-32", name, "rate") / n2, 1.0,
               ">=", x)
        _check(rows, f"event ({loop}) W2-32: CPU/reply ≤ 1.2× naive W2-4",
               m("W2-32", name, "cpu_per_op_us") / c2, 1.2, "<=", x)
        _check(rows, f"event ({loop}) W2-1000: connections with no reply = 0 (worst run)",
               worst("W2-1000", name, "starved"), 0, "<=", lambda v: f"{v:,.0f} of 1,000")
        _check(rows, f"event ({loop}) W1-4: conn/s ≥ 0.9× naive",
               m("W1-4", name, "rate") / m("W1-4", BASELINE, "rate"), 0.9, ">=", x)
    w6 = cap.get("w6") or {}
    for name in EVENT_PEERS:
        loop = "uvloop" if "uvloop" in name else "asyncio"
        rs = w6.get("W6-400", {}).get(name, [])
        _check(rows, f"event ({loop}) W6: fresh clients' p99 < 50 ms under 200 silent + 200 trickling",
               med([r["p99_us"] / 1000 for r in rs]), 50.0, "<=", lambda v: f"{v:.1f} ms" if v < 1e9 else "∞",
               "more than 1% of fresh clients unanswered in 1 s" if rs and med([r["p99_us"] for r in rs]) == float(
                   "inf") else "")
    w7 = cap.get("w7") or {}
    for name in EVENT_PEERS:
        r = w7.get(name, {})
        loop = "uvloop" if "uvloop" in name else "asyncio"
        held = r.get("held", 0)
        note = f"only {held:,} of {IDLE_CONNECTIONS:,} held" if r and held < IDLE_CONNECTIONS else ""
        for k in ("uss", "rss"):
            _check(rows, f"event ({loop}) W7: {k.upper()} per idle connection ≤ 16 KiB (10,000 held)",
                   r.get(f"{k}_per_conn", float("nan")) / 1024 if held >= IDLE_CONNECTIONS else float("nan"), 16.0,
                   "<=", lambda v: f"{v:.2f} KiB", note or r.get("error", ""))
    w8 = cap.get("w8") or {}
    _check(rows, "dynamic W8: new worker → first reply, median < 100 ms", med(w8.get("new_worker_ms", [])), 100.0,
           "<=", lambda v: f"{v:.1f} ms", w8.get("error", ""))
    return rows


def _ms(us: float, nd: int = 1) -> str:
    if us == float("inf"):
        return "∞"
    return fmt(us / 1000, nd)


def capacity_report(a, args, peers: list[Peer], cap: dict) -> None:
    """The W6, W7 and W8 sections."""
    w6, w7, w8 = cap.get("w6"), cap.get("w7"), cap.get("w8")
    a("## W6 — slow clients: fresh short connections while silent and trickling ones are held\n")
    if not w6:
        a("Not measured.\n")
    else:
        a(f"Per peer and run: the load generator opens the *silent* connections (connect, then nothing) "
          f"and the *trickling* ones (one byte every {TRICKLE_MS} ms, never a line end), waits 0.3 s, then "
          f"measures fresh short connections (W1: connect, `PING`, `+PONG`, close) with {FRESH_CLIENTS} clients "
          f"for {args.slow_duration:g} s, each given {SLOW_TIMEOUT_MS} ms before it counts as failed and is "
          "retried. *p99* counts a failed attempt as infinitely slow: ∞ when more than 1% failed. preforkd "
          "runs with its defaults (`idle_timeout` 300 s, `line_timeout` 60 s), so nothing is cut during "
          f"the cell. {args.slow_runs} runs, medians.\n")
        for key, silent, trickle in SLOW_CELLS:
            if key not in w6:
                continue
            what = f"{silent} silent" + (f" and {trickle} trickling" if trickle else "")
            a(f"### {what} connections held\n")
            a("| peer | fresh conn/s | answered / attempts | p50 ms | p99 ms | p99 of the answered ms | "
              "held connections closed by the server |")
            a("|---|---|---|---|---|---|---|")
            for p in peers:
                rs = w6[key].get(p.name, [])
                label = f"**{p.label}**" if is_preforkd(p.name) else p.label
                if not rs:
                    a(f"| {label} | failed: {_md(p.error or 'not run')} | | | | | |")
                    continue
                a(f"| {label} | {fmt(med([r['rate'] for r in rs]))} | "
                  f"{sum(r['ok'] for r in rs):,} / {sum(r['attempts'] for r in rs):,} | "
                  f"{_ms(med([r['p50_us'] for r in rs]), 2)} | {_ms(med([r['p99_us'] for r in rs]))} | "
                  f"{_ms(med([r['p99_ok_us'] for r in rs]))} | {sum(r['closed'] for r in rs)} |")
            a("")
        a("A pool of N one-connection workers is taken by its first N silent clients: everything after them "
          "waits in the accept queue. A dynamic pool grows to `max_workers` (64) and is then taken the same "
          "way by 400. Event-driven workers hold the slow connections as idle sockets in their event loop.\n")

    a("## W7 — idle capacity: 10,000 idle connections\n")
    if not w7:
        a("Not measured.\n")
    else:
        a(f"{IDLE_CONNECTIONS:,} connections, opened at most 500 at a time from 16 loopback source addresses; "
          "each sends one `PING`, reads its `+PONG` (so the server has accepted and served it) and then stays "
          "open and silent. preforkd runs 4 event-driven workers with `worker_connections = "
          f"{IDLE_WORKER_CONNECTIONS:,}` (room for all 10,000 however unevenly the kernel spreads them). Memory: "
          "psutil `memory_full_info()` of the processes holding the connections (preforkd's workers; the "
          "single process of asyncio and redis) after the warm-up of W4 and again 1 s after the last connection "
          "was answered; the growth divided by the connections held. Kernel socket memory is not in these "
          "figures (it is the same for every peer). *Fresh clients*: W1 with 4 clients for 1 s while the "
          "10,000 are held. The pre-fork pools (fixed or dynamic) cannot hold 10,000 connections and are not "
          "run.\n")
        a("| peer | held (of 10,000) | time to open all s | USS growth MiB | **KiB per connection (USS)** | "
          "RSS growth MiB | KiB per connection (RSS) | connections per worker | fresh clients: conn/s, p99 ms |")
        a("|---|---|---|---|---|---|---|---|---|")
        for name, r in w7.items():
            label = f"**{r.get('label', name)}**" if is_preforkd(name) else r.get("label", name)
            if r.get("error") and "held" not in r:
                a(f"| {label} | failed: {_md(r['error'])} | | | | | | | |")
                continue
            du = (r["after"]["uss"] - r["before"]["uss"]) / 2**20
            dr = (r["after"]["rss"] - r["before"]["rss"]) / 2**20
            pw = ", ".join(f"{x:,}" for x in r.get("per_worker", [])) or "–"
            failed = f" ({r['probe_failed']} failed)" if r.get("probe_failed") else ""
            a(f"| {label} | {r['held']:,} | {r['open_s']:.1f} | {du:.1f} | **{r['uss_per_conn'] / 1024:.2f}** | "
              f"{dr:.1f} | {r['rss_per_conn'] / 1024:.2f} | {pw} | {fmt(r['probe_rate'])}, "
              f"{_ms(r['probe_p99_us'])}{failed} |")
        a("")

    a("## W8 — a connection that needs a new worker (dynamic pool)\n")
    if not w8:
        a("Not measured.\n")
    elif not w8.get("new_worker_ms"):
        a(f"Not measured: {_md(w8.get('error', 'no sample'))}\n")
    else:
        a("preforkd with `workers = 4`, `max_workers = 64` (`min_spare_workers` 1, the default). The pool is "
          "first settled (no worker starting, one idle) with every other worker held busy by a persistent "
          "connection; then one client more than there are idle workers connects at once, each sending "
          "`PING` and holding its connection: the idle worker takes one, the last one needs a new worker "
          "(the busy worker wakes the master, which forks). Sample: that connection's `connect()` → `+PONG`. "
          f"The held connections stay, so each of the {w8['repeats']} repeats starts from a pool two workers "
          "bigger.\n")
        pe = w8.get("pool_end", {})
        a("| | median (min–max) ms |\n|---|---|")
        a(f"| connection that needs a new worker → first reply | **{fmt_spread(w8['new_worker_ms'], 1)}** |")
        a(f"| the other one, served by the idle spare | {fmt_spread(w8['spare_ms'], 2)} |")
        a(f"| pool at the end | {pe.get('current', '–')} workers, {pe.get('busy', '–')} busy, "
          f"{w8.get('held', '–')} connections held |")
        if w8.get("error"):
            a(f"| error | {_md(w8['error'])} |")
        a("")


def capacity_targets_section(a, results: dict, cap: dict) -> None:
    a("## Targets (issue 8)\n")
    a(TARGET_DEFS_8.replace("\n", " ") + "\n")
    a("| target | preforkd | verdict | margin |\n|---|---|---|---|")
    for row in capacity_targets(results, cap):
        a("| " + " | ".join(_md(x) if i != 2 else x for i, x in enumerate(row)) + " |")
    a("")


PEER_COLORS = {"preforkd": "#1f77b4", "preforkd-dynamic": "#17becf", "preforkd-event": "#393b79",
               "preforkd-uvloop": "#9c9ede", "naive": "#7f7f7f", "forking": "#d62728", "asyncio": "#2ca02c",
               "netserver": "#9467bd", "redis": "#ff7f0e"}


def make_chart(results: dict, peers: list[Peer], path: Path, cap: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p.name for p in peers]
    labels = {p.name: p.label for p in peers}
    fig, axes = plt.subplots(3, 2, figsize=(14, 13))
    panels = [
        (axes[0][0], ("W1-4", "W1-32"), "rate", "W1 short connections: connections/s"),
        (axes[0][1], ("W1-4", "W1-32"), "cpu_per_op_us", "W1 server CPU µs per connection (lower is better)"),
        (axes[1][0], ("W2-4", "W2-32", "W2-1000"), "rate", "W2 persistent: replies/s"),
        (axes[1][1], ("W2-4", "W2-32", "W2-1000"), "cpu_per_op_us", "W2 server CPU µs per reply (lower is better)"),
    ]
    colors = [PEER_COLORS.get(n, "#bcbd22") for n in names]
    width = 0.8 / max(1, len(names))
    for ax, cells, key, title in panels:
        for i, n in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for j, c in enumerate(cells):
                vals = [r[key] for r in results.get(c, {}).get(n, [])]
                if not vals:
                    continue
                mv = med(vals)
                a, b = spread(vals)
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(mv)
                lo.append(mv - a)
                hi.append(b - mv)
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=labels[n], color=colors[i])
                base = [med([r[key] for r in results.get(c, {}).get(BASELINE, [])]) for c in cells]
                for x, y, top, c in zip(xs, ys, [y + h for y, h in zip(ys, hi, strict=True)],
                                        [c for c in cells if results.get(c, {}).get(n)], strict=False):
                    b0 = base[cells.index(c)]
                    if b0 == b0 and b0:
                        ax.annotate(f"{y / b0:.2f}", (x, top), ha="center", va="bottom", fontsize=6,
                                    xytext=(0, 2), textcoords="offset points", rotation=90)
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels([f"{c.split('-')[1]} {'clients' if c.startswith('W1') else 'connections'}" for c in cells])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if key == "cpu_per_op_us" and cells[0].startswith("W1"):
            ax.set_yscale("log")
            ax.set_title(title + ", log scale", fontsize=10)
        ax.margins(y=0.12)
    _capacity_panels(axes[2], names, labels, colors, cap or {})
    handles, labs = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labs, loc="lower center", ncol=(len(labs) + 1) // 2, fontsize=9, frameon=False)
    fig.suptitle("preforkd vs peers, 4-worker pools, 2 cores shared with the client\n"
                 "(median of runs, whiskers: min–max, numbers: ratio to the naive pre-fork)", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _capacity_panels(axes, names: list[str], labels: dict, colors: list[str], cap: dict) -> None:
    """W6: the fresh clients' p99 under slow clients (∞ drawn at the timeout, hatched);
    W7: memory per idle connection."""
    ax = axes[0]
    w6 = cap.get("w6") or {}
    keys = [k for k, *_ in SLOW_CELLS if k in w6]
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        for j, k in enumerate(keys):
            rs = w6[k].get(n, [])
            if not rs:
                continue
            v = med([r["p99_us"] for r in rs]) / 1000
            x = j + (i - (len(names) - 1) / 2) * width
            unanswered = v == float("inf")
            ax.bar([x], [SLOW_TIMEOUT_MS if unanswered else v], width, color=colors[i],
                   hatch="//" if unanswered else None, edgecolor="white" if unanswered else None)
            ax.annotate("∞" if unanswered else f"{v:.1f}", (x, SLOW_TIMEOUT_MS if unanswered else v), ha="center",
                        va="bottom", fontsize=6, xytext=(0, 2), textcoords="offset points")
    ax.axhline(50, color="black", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{s} silent" + (f" + {t} trickling" if t else "") for k, s, t in SLOW_CELLS if k in w6])
    ax.set_title("W6 fresh clients' p99 ms under slow clients, log scale (hatched: > 1% unanswered; "
                 "dashed: 50 ms target)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    w7 = cap.get("w7") or {}
    rows = [(n, r) for n, r in w7.items() if r.get("held")]
    for j, (n, r) in enumerate(rows):
        c = colors[names.index(n)] if n in names else PEER_COLORS.get(n, "#bcbd22")
        for k, (key, off) in enumerate((("uss_per_conn", -0.2), ("rss_per_conn", 0.2))):
            v = r[key] / 1024
            ax.bar([j + off], [v], 0.38, color=c, alpha=1.0 if k == 0 else 0.55)
            ax.annotate(f"{v:.1f}", (j + off, v), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
    ax.axhline(16, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.get("label", n).replace(" (", "\n(") for n, r in rows], fontsize=7)
    ax.set_title("W7 KiB per idle connection, 10,000 held (left: USS growth, right: RSS growth; "
                 "dashed: 16 KiB target)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def write_report(path: Path, png: Path, args, peers: list[Peer], results: dict, w3: dict, w4: dict,
                 w5: dict, minfo: dict, started: float, argv: list[str], cap: dict | None = None) -> None:
    cap = cap or {}
    notes = ""
    if path.exists():
        old = path.read_text()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old[old.index(NOTES_BEGIN) + len(NOTES_BEGIN):old.index(NOTES_END)].strip("\n")
    if not notes:
        notes = ("_Hand-written notes go here: each optimisation and its measured effect. "
                 "benchmarks/run.py keeps this block when it rewrites the page._")
    L: list[str] = []
    a = L.append
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    a("# Performance\n")
    a(f"Generated by `benchmarks/run.py` on {now} in {(time.monotonic() - started) / 60:.1f} minutes"
      f"{' (**--quick smoke run: 1 run, short cells; not for conclusions**)' if args.quick else ''}. "
      "Every workload ran against every peer in this one run, on the same machine, side by side; "
      "ratios are to the naive stdlib pre-fork, the floor preforkd must not fall below. "
      "The tables are regenerated by each run; only the notes block below is kept.\n")
    a("![chart](performance.png)\n" if png.parent == path.parent else f"![chart]({png})\n")
    a("## Machine\n")
    a("| | |\n|---|---|")
    a(f"| CPU | {minfo['cpu']} |")
    a(f"| cores | {minfo['cores']} (client and server share them) |")
    a(f"| memory | {minfo['mem_gib']:.0f} GiB |")
    a(f"| OS, kernel | {minfo['os']}, Linux {minfo['kernel']} |")
    a(f"| Python | {minfo['python']} |")
    a(f"| load generator | benchmarks/loadgen.c, {minfo['gcc']}, `-O2` |")
    for p in peers:
        a(f"| {p.label} | {p.version()} |")
    a("")
    a("## Method\n")
    a(f"- Runs: {args.runs} per cell, {args.duration:g} s per cell; tables give the **median** and "
      "the spread (min–max) across runs. Peers are interleaved inside every run and their order rotates "
      "from run to run.")
    a("- Pool of 4 workers wherever the peer has a pool (preforkd, naive pre-fork, Net::Server::PreFork); "
      "ForkingTCPServer forks per connection, asyncio and redis are one process.")
    a("- All peers answer `PING` with `+PONG\\r\\n` (and echo other lines); W1/W2 send only `PING` so "
      "that redis's inline protocol fits. Every reply is checked byte for byte by the load generator.")
    a("- **Server CPU** is user+system time of the server's whole process tree (psutil: every live "
      "process's own and reaped children's times, zombies included), read just before and just after "
      "each cell, divided by the replies. On loopback part of the TCP work (handshakes, softirq) is "
      "charged to whichever process is running, often the client, so it is a comparison between "
      "peers, not an absolute cost.")
    a("- The load generator is single-threaded C with epoll; its own CPU use and the whole machine's "
      "busy share are reported per cell (*client CPU*, *machine*), so a cell limited by the client "
      "(client near 100% of its core) shows as such. Short connections spread over 64 loopback "
      "source addresses (127.0.0.1–127.0.0.64) so the client's ephemeral-port search among "
      "TIME_WAIT sockets does not dominate.")
    a(f"- Noise: CPU used by processes other than the server and the client is measured per cell "
      f"(/proc/stat minus both); a cell where it exceeded {NOISE_CORES:g} cores is measured again (up to 3 "
      f"attempts within a retry budget of {args.retry_budget:g} s for all of W1/W2, the quietest kept). A run that "
      "stayed noisy is left out of the median when at least 3 quiet runs remain (*noisy* column: "
      "runs left out / noisy runs kept).")
    a("- Latency: W1 from the `connect()` call to the last reply byte; W2 from send to the last reply byte.\n")
    a("Commands (the harness runs them; PORT is the port each peer reported, $WORKDIR a temporary "
      "directory):\n")
    a("```sh")
    a("bash benchmarks/setup.sh          # packages, loadgen, matplotlib (make bench does both)")
    a(f"{PY.relative_to(ROOT) if PY.is_relative_to(ROOT) else PY} benchmarks/run.py {' '.join(argv)}".rstrip())
    for p in peers:
        if p.command:
            a(f"# {p.label}:")
            a(_rel(p.command))
    if any(p.name == "preforkd" for p in peers):
        a("# preforkd config (written to a temp dir):")
        for line in preforkd_config_text('"<absolute path of benchmarks/>"').splitlines():
            if line:
                a("#   " + line)
    for p in peers:
        if isinstance(p, PreforkdPeer) and p.name != "preforkd":
            extra = [f"{k} = {json.dumps(v)}" for k, v in p.supervisor_keys.items()]
            extra += [f"{k} = {json.dumps(v)}" for k, v in p.service_keys.items()]
            a(f"# {p.label}: the same config plus " + "; ".join(extra)
              + " (event_loop in [supervisor])" * bool(p.supervisor_keys))
    a("# W1 (per cell):  benchmarks/build/loadgen -m short -p PORT -c {4,32} "
      f"-d {args.duration:g} -S 64")
    a(f"# W2 (per cell):  benchmarks/build/loadgen -m persistent -p PORT -c {{4,32}} -d {args.duration:g}")
    if w3.get("loadgen"):
        a(f"# W3: both at once, stopped with SIGTERM after the last reload; {w3['hups']} × kill -HUP MASTER_PID")
        for c in w3["loadgen"]:
            a("#     " + _rel(c).replace(f"-p {w3.get('port')} ", "-p PORT ").replace(" -d 600", ""))
    a("# W4: the same peers with 16 workers (preforkd workers = 16, naive_prefork.py --workers 16,")
    a("#     netserver_prefork.pl 0 16), 1 s of W1 and W2 load with 16 clients, then psutil memory_full_info()")
    if (w5 or {}).get("preforkd", {}).get("command"):
        a("# W5: " + _rel(w5["preforkd"]["command"])
          + "   (port fixed in the config), one PING, then preforkd stop -c …")
    a("```\n")

    failed = [p for p in peers if p.error]
    if failed:
        a("## Peers that failed\n")
        a("| peer | reason |\n|---|---|")
        for p in failed:
            a(f"| {p.label} | {_md(p.error)} |")
        a("")

    for wl, title, unit, per in (("W1", "W1 — short connections (connect, `PING`, `+PONG`, close)", "conn/s", "conn"),
                                 ("W2", "W2 — persistent request/reply, one line in flight per connection",
                                  "replies/s", "reply")):
        a(f"## {title}\n")
        for key, w, _mode, conc in CELLS:
            if w != wl or key not in results:
                continue
            a(f"### {conc:,} concurrent {'clients' if wl == 'W1' else 'connections'}\n")
            head = (f"| peer | {unit} | × naive | server CPU µs/{per} | × naive | p50 µs | p99 µs | "
                    f"errors (refused/reset/wrong/other) |")
            if wl == "W2":
                head += " connections with no reply | slowest first reply ms |"
            head += " client CPU | machine | noisy |"
            a(head)
            a("|" + "---|" * (head.count("|") - 1))
            base = results[key].get(BASELINE, [])
            brate = med([r["rate"] for r in base])
            bcpu = med([r["cpu_per_op_us"] for r in base])
            for p in peers:
                rs = results[key].get(p.name, [])
                if not rs:
                    why = NOT_RUN.get((key, p.name)) or f"failed: {p.error or 'not run'}"
                    row = f"| {p.label} | {_md(why)} |" + " |" * (head.count("|") - 3)
                    a(row)
                    continue
                rate = [r["rate"] for r in rs]
                cpu = [r["cpu_per_op_us"] for r in rs]
                errs = "/".join(str(sum(r[k] for r in rs)) for k in ("refused", "reset", "wrong", "other"))
                row = (f"| {'**' + p.label + '**' if is_preforkd(p.name) else p.label} | {fmt_spread(rate)} | "
                       f"{ratio(med(rate), brate)} | {fmt_spread(cpu, 1)} | {ratio(med(cpu), bcpu)} | "
                       f"{fmt(med([r['p50_us'] for r in rs]))} | {fmt(med([r['p99_us'] for r in rs]))} | {errs} |")
                if wl == "W2":
                    starved = [r["starved"] for r in rs]
                    worst = f" (max {max(starved):,})" if max(starved) != med(starved) else ""
                    slowest = fmt(med([r.get("first_max_ms", float("nan")) for r in rs]), 1)
                    row += (f" {fmt(med(starved))} of {conc:,}{worst} |"
                            f" {'never (starved)' if med(starved) else slowest} |")
                row += (f" {med([r['loadgen_cpu_util'] for r in rs]):.0%} | "
                        f"{med([r['machine_busy'] for r in rs]):.0%} | "
                        f"{DROPPED.get(key, {}).get(p.name, 0)} / "
                        f"{sum(1 for r in rs if r.get('foreign_cores', 0) > NOISE_CORES)} |")
                a(row)
            a("")
        if wl == "W2":
            a("A pool of 4 workers that each serve one connection at a time cannot serve more than 4 "
              "persistent connections: with 32, the other 28 wait in the accept queue and get no reply "
              "until a worker frees up, which in this workload never happens. That is the pre-fork model "
              "(preforkd's fixed pool, the naive pre-fork, Net::Server::PreFork), reported as it is. "
              "preforkd's dynamic pool grows to one worker per connection up to `max_workers` (64), so "
              "it serves 32 but not 1,000; its event-driven workers serve up to 4 × 1,000. *Slowest "
              "first reply*: from the `connect()` call of the connection that waited longest to its "
              "first reply (the load generator opens all connections at once; a dynamic pool grows "
              "meanwhile).\n")

    a("## W3 — reload under load (preforkd only)\n")
    if not w3 or ("error" in w3 and "reloads" not in w3):
        a(f"Not measured: {_md((w3 or {}).get('error', 'skipped'))}\n")
    else:
        a(f"{w3['hups']} SIGHUPs to the master, each sent once the previous reload had logged "
          f"`config.reloaded` and {args.hup_settle:g} s had passed, while the load generator ran short "
          "connections (4 clients) and persistent request/reply (2 connections) with a 2 s per-request "
          "timeout. *Internal* is preforkd's `duration_ms` (HUP received → all new workers accepting); "
          "*external* is from the harness's `kill(HUP)` to reading the `config.reloaded` line.\n")
        s, pz = w3.get("short", {}), w3.get("persistent", {})
        a("| | value |\n|---|---|")
        a(f"| reloads completed | {w3.get('reloads')} of {w3['hups']} (generations {_gens(w3.get('generations'))}) |")
        a(f"| master pid unchanged | {'yes' if w3.get('same_pid') else 'no'} |")
        a(f"| failed connections/requests (total) | **{w3.get('failed')}** |")
        for nm, r in (("short", s), ("persistent", pz)):
            if "ok" in r:
                a(f"| {nm}: ok / refused / reset / wrong / timeout / other | {r['ok']} / {r['refused']} / "
                  f"{r['reset']} / {r['wrong']} / {r['timeout']} / {r['other']} ({r['rate']:.0f}/s, "
                  f"p99 {r['p99_us']:.0f} µs, max {r['max_us'] / 1000:.0f} ms) |")
        a(f"| HUP → new generation accepting, internal p50 / max | {fmt(med(w3.get('internal_ms', [])))} / "
          f"{fmt(max(w3.get('internal_ms') or [float('nan')]))} ms |")
        a(f"| HUP → new generation accepting, external p50 / max | {fmt(med(w3.get('external_ms', [])))} / "
          f"{fmt(max(w3.get('external_ms') or [float('nan')]))} ms |")
        if w3.get("reload_failed_events"):
            a(f"| `config.reload_failed` events | {w3['reload_failed_events']} |")
        if w3.get("errors") or w3.get("error"):
            a(f"| errors | {_md('; '.join(w3.get('errors', []) + ([w3['error']] if w3.get('error') else [])))} |")
        a("")
        if w3.get("phases_ms"):
            a("Where the time goes: each log event's first appearance after the HUP, ms from the "
              "harness's `kill(HUP)` to reading the line (median over the reloads, and how many reloads "
              "logged it):\n")
            a("| event | ms after HUP, median (min–max) | reloads |\n|---|---|---|")
            for nm, vs in sorted(w3["phases_ms"].items(), key=lambda kv: med(kv[1])):
                a(f"| `{_md(nm)}` | {fmt_spread(vs, 1)} | {len(vs)} |")
            a("")
        a("Persistent connections stay with the worker that accepted them: across a reload that worker "
          "is retired gracefully and keeps serving the connection until the client closes it (or "
          "`graceful_timeout`), so persistent load tests that no request is dropped, short connections "
          "test that no connection is refused during the re-exec.\n")

    a("## W4 — memory with 16 workers after a warm-up\n")
    if not w4:
        a("Not measured.\n")
    else:
        a("After 1 s of short and 1 s of persistent load with 16 clients; psutil `memory_full_info()` "
          "of every direct child (worker) and of the master. USS: pages only that process holds; PSS: "
          "shared pages divided among their sharers; RSS counts all shared pages in full.\n")
        a("| peer | workers | worker USS MiB median (min–max) | worker PSS MiB median | worker RSS MiB median | "
          "master USS MiB | master RSS MiB |")
        a("|---|---|---|---|---|---|---|")
        for name, label in (("preforkd", "**preforkd**"), ("naive", "naive pre-fork"),
                            ("netserver", "Net::Server::PreFork")):
            r = w4.get(name)
            if not r:
                continue
            if r.get("error"):
                a(f"| {label} | failed: {_md(r['error'])} | | | | | |")
                continue
            mib = lambda xs: [x / 2**20 for x in xs]  # noqa: E731
            a(f"| {label} | {r['workers']} | {fmt_spread(mib(r['worker_uss']), 2)} | "
              f"{fmt(med(mib(r['worker_pss'])), 2)} | {fmt(med(mib(r['worker_rss'])), 2)} | "
              f"{r['master_uss'] / 2**20:.2f} | {r['master_rss'] / 2**20:.2f} |")
        a("")

    a("## W5 — start-up\n")
    p5 = (w5 or {}).get("preforkd", {})
    n5 = (w5 or {}).get("naive", {})
    if not w5:
        a("Not measured.\n")
    else:
        a("`preforkd start -c CONFIG` daemonizes and returns once the listeners are bound and the "
          "workers are up; then one `PING` is sent. The naive pre-fork has no readiness signal: it is "
          "polled from process start to the first `+PONG`.\n")
        a("| | median (min–max) ms |\n|---|---|")
        if p5.get("start_ms"):
            a(f"| `preforkd start` until it returned | {fmt_spread(p5['start_ms'])} |")
            a(f"| `preforkd start` until the first reply | {fmt_spread(p5['first_reply_ms'])} |")
        if p5.get("error"):
            a(f"| preforkd | failed: {_md(p5['error'])} |")
        if n5.get("first_reply_ms"):
            a(f"| naive pre-fork: process start until the first reply | {fmt_spread(n5['first_reply_ms'])} |")
        a("")

    capacity_report(a, args, peers, cap)

    a("## Targets (issue 4)\n")
    a(TARGET_DEFS.replace("\n", " ") + "\n")
    a("| target | preforkd | verdict | margin |\n|---|---|---|---|")
    for row in targets(results, w3, w4):
        a("| " + " | ".join(_md(x) if i != 2 else x for i, x in enumerate(row)) + " |")
    a("")
    capacity_targets_section(a, results, cap)
    a("## Is the load generator the bottleneck?\n")
    a(_bottleneck_text(results, peers))
    a("")
    a("## Notes\n")
    a(NOTES_BEGIN)
    a(notes)
    a(NOTES_END)
    a("")
    path.write_text("\n".join(L))


def _bottleneck_text(results: dict, peers: list[Peer]) -> str:
    lines = []
    for key, _wl, _mode, _conc in CELLS:
        parts = []
        for p in peers:
            rs = results.get(key, {}).get(p.name, [])
            if rs:
                parts.append(f"{p.name} {med([r['loadgen_cpu_util'] for r in rs]):.0%} "
                             f"({fmt(med([r['loadgen_cpu_per_op_us'] for r in rs]), 1)} µs/op)")
        if parts:
            lines.append(f"- {key}: client CPU (share of one core, and per operation): " + ", ".join(parts))
    rr = {k: med([r["rate"] for r in results.get(k, {}).get("redis", [])]) for k, *_ in CELLS}
    txt = ("The client is one thread, so it limits a cell only when its CPU share is near 100%. "
           "redis-server (C, one event loop) is the reference for what the client and the kernel can do "
           "on this machine: ")
    txt += ", ".join(f"{k} {fmt(v)}/s" for k, v in rr.items() if v == v) + ". "
    txt += ("A Python peer well below those rates is limited by itself, not by the client. "
            "Short connections are dominated by the kernel's TCP set-up and tear-down on both sides "
            "(see the *machine* column: the two cores are close to saturated), which is why server "
            "CPU per connection is the steadier comparison there.\n\n")
    return txt + "\n".join(lines) + "\n"


def _gens(g):
    g = [x for x in (g or []) if x is not None]
    return f"{g[0]}…{g[-1]}" if g else "–"


def _md(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


WORKDIR_TOKEN: list[str] = []


def _rel(cmd: str) -> str:
    for w in WORKDIR_TOKEN:
        cmd = cmd.replace(w, "$WORKDIR")
    return cmd.replace(str(ROOT) + "/", "")


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 run, 1 s cells, fewer HUPs")
    ap.add_argument("--runs", type=int, help="runs per cell (default 5; --quick 1)")
    ap.add_argument("--duration", type=float, help="seconds per cell (default 3; --quick 1)")
    ap.add_argument("--hups", type=int, help="SIGHUPs in W3 (default 20; --quick 5)")
    ap.add_argument("--hup-settle", type=float, default=0.2, help="pause after each reload in W3 (s)")
    ap.add_argument("--retry-budget", type=float, default=90.0,
                    help="seconds W1/W2 may spend re-measuring cells disturbed by other processes")
    ap.add_argument("--peers", help="comma-separated subset of: " + ",".join(c.name for c in PEER_CLASSES))
    ap.add_argument("--skip", default="",
                    help="comma-separated workloads to skip: W1W2,W2-1000,W3,W4,W5,W6,W7,W8")
    ap.add_argument("--slow-runs", type=int, help="runs per W6 cell (default 3; --quick 1)")
    ap.add_argument("--slow-duration", type=float, help="seconds of fresh clients per W6 cell (default 2; --quick 1)")
    ap.add_argument("--idle-connections", type=int, default=IDLE_CONNECTIONS, help="W7 connections (default 10000)")
    ap.add_argument("--spawn-repeats", type=int, help="W8 repeats (default 10; --quick 3)")
    ap.add_argument("--out-dir", type=Path,
                    help="where performance.md/.png go (default docs/; --quick: benchmarks/build/quick/)")
    args = ap.parse_args()
    argv = sys.argv[1:]
    args.runs = args.runs or (1 if args.quick else 5)
    args.duration = args.duration or (1.0 if args.quick else 3.0)
    args.hups = args.hups or (5 if args.quick else 20)
    args.slow_runs = args.slow_runs or (1 if args.quick else 3)
    args.slow_duration = args.slow_duration or (1.0 if args.quick else 2.0)
    args.spawn_repeats = args.spawn_repeats or (3 if args.quick else 10)
    out_dir = args.out_dir or (BENCH / "build" / "quick" if args.quick else ROOT / "docs")
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = {s.strip().upper() for s in args.skip.split(",") if s.strip()}

    if not LOADGEN.exists():
        log("compiling benchmarks/build/loadgen")
        LOADGEN.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-o", str(LOADGEN), str(BENCH / "loadgen.c")], check=True)

    raise_nofile_limit()
    started = time.monotonic()
    minfo = machine_info()
    log(f"machine: {minfo['cpu']}, {minfo['cores']} cores, Linux {minfo['kernel']}, Python {minfo['python']}")
    workdir = Path(tempfile.mkdtemp(prefix="preforkd-bench-"))
    WORKDIR_TOKEN.append(str(workdir))
    classes = PEER_CLASSES
    if args.peers:
        want = [s.strip() for s in args.peers.split(",")]
        classes = [c for c in PEER_CLASSES if c.name in want]
    peers: list[Peer] = []
    results: dict = {key: {} for key, *_ in CELLS}
    w3: dict = {}
    w4: dict = {}
    w5: dict = {}
    cap: dict = {}
    cells = [c for c in CELLS if c[0] not in skip]

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    try:
        for cls in classes:
            p = cls(workdir)
            peers.append(p)
            if "W1W2" in skip and "W6" in skip:
                continue
            log(f"starting {p.label}")
            try:
                p.start()
                log(f"  {p.name}: pid {p.proc.pid if p.proc else '?'}, port {p.port}")
            except Exception as e:  # noqa: BLE001
                p.error = f"start failed: {e}"
                log(f"  {p.name}: {p.error}")
                p.stop()
        if "W1W2" not in skip:
            log(f"W1/W2: {args.runs} runs × {len(cells)} cells × {len(peers)} peers × {args.duration:g} s")
            results = run_w1_w2(peers, args.runs, args.duration, args.retry_budget, cells)
        if "W6" not in skip:
            log(f"W6: slow clients, {args.slow_runs} runs × {len(SLOW_CELLS)} cells × {len(peers)} peers")
            cap["w6"] = run_w6(peers, args.slow_runs, args.slow_duration)
        for p in peers:
            p.stop()
        if "W3" not in skip and any(p.name == "preforkd" for p in peers):
            log(f"W3: {args.hups} HUPs under load")
            w3 = run_w3(workdir, args.hups, args.hup_settle)
        if "W4" not in skip:
            log("W4: memory with 16 workers")
            w4 = run_w4(workdir, 0.5 if args.quick else 1.0)
        if "W5" not in skip and any(p.name == "preforkd" for p in peers):
            log("W5: start-up")
            w5 = run_w5(workdir, 2 if args.quick else 5)
        if "W7" not in skip:
            log(f"W7: {args.idle_connections:,} idle connections")
            cap["w7"] = run_w7(workdir, args.idle_connections, 0.5 if args.quick else 1.0,
                               {p.name for p in peers} if args.peers else None)
        if "W8" not in skip and any(p.name == "preforkd-dynamic" for p in peers):
            log(f"W8: a connection that needs a new worker, {args.spawn_repeats} repeats")
            cap["w8"] = run_w8(workdir, args.spawn_repeats)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        interrupted = True
    finally:
        for p in peers:
            with contextlib.suppress(Exception):
                p.stop()
        REAPER.stop_all()
    if interrupted:
        log(f"no report written; scratch files in {workdir}")
        return 1
    md = out_dir / "performance.md"
    png = out_dir / "performance.png"
    try:
        make_chart(results, peers, png, cap)
    except Exception as e:  # noqa: BLE001
        log(f"chart failed: {e}")
    write_report(md, png, args, peers, results, w3, w4, w5, minfo, started, argv, cap)
    with contextlib.suppress(OSError):
        (BENCH / "build" / "last-run.json").write_text(json.dumps(
            {"results": results, "w3": w3, "w4": w4, "w5": w5, **cap, "machine": minfo,
             "errors": {p.name: p.error for p in peers if p.error}}, indent=1, default=str))
    log(f"wrote {md.relative_to(ROOT) if md.is_relative_to(ROOT) else md} and {png.name} "
        f"in {(time.monotonic() - started) / 60:.1f} min")
    for row in targets(results, w3, w4) + capacity_targets(results, cap):
        log(f"  {row[2]:>12}  {row[0]}: {row[1]} {row[3]}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
