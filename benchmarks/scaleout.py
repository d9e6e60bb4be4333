#!/usr/bin/env python3
"""Scale-out figures: the cost of the PROXY protocol per connection, and connections/s
through HAProxy to three preforkd instances against one instance direct.

    .venv/bin/python benchmarks/scaleout.py              # 5 runs of 3 s cells
    .venv/bin/python benchmarks/scaleout.py --runs 1 --seconds 1   # smoke run

Needs benchmarks/build/loadgen (bash benchmarks/setup.sh) and haproxy (apt-get install
haproxy). Prints a Markdown block for the notes of docs/performance.md; every process
it starts is stopped by PID in a finally.

Arms, interleaved within every run (their order rotates from run to run) so that each
run's ratios compare cells measured moments apart on this shared machine:

* W1 (short connections, 4 clients, 64 source addresses) against one preforkd of 4
  workers: without ``proxy_protocol``; with it, every connection starting with a PROXY
  v2 header (28 bytes, TCP4) in the same packet as ``PING``; and with a v1 header.
* W1 through HAProxy (the haproxy.cfg of docs/scale-out.md, ``send-proxy-v2`` and
  ``agent-check``) to three instances of 4 workers on 127.0.0.2-4, and to one; and the
  same load against one instance direct (no HAProxy, no PROXY header).

Server CPU is user+system of the preforkd process trees (HAProxy's own CPU is reported
apart), per connection.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = ROOT / ".venv" / "bin" / "python"
LOADGEN = BENCH / "build" / "loadgen"
HAPROXY = "/usr/sbin/haproxy"

V2 = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11, 0, 12]) + socket.inet_aton("192.0.2.1")
      + socket.inet_aton("192.0.2.2") + (40000).to_bytes(2, "big") + (7000).to_bytes(2, "big"))
V1 = b"PROXY TCP4 192.0.2.1 192.0.2.2 40000 7000\r\n"


def escape(data: bytes) -> str:
    return "".join(f"\\x{b:02x}" for b in data)


def tree_cpu(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class Procs:
    """Every process started here, stopped by PID."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen] = []

    def start(self, argv: List[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    for c in psutil.Process(p.pid).children(recursive=True):
                        c.kill()
                    p.kill()
                    p.wait(5)


PROCS = Procs()


def preforkd(workdir: Path, name: str, ip: str, proxy: bool, agent: bool) -> Tuple[int, int, Optional[int]]:
    """Start one instance; returns (pid, port, agent port)."""
    d = workdir / name
    d.mkdir()
    cfg = d / "preforkd.toml"
    cfg.write_text(textwrap.dedent(f'''
        [supervisor]
        pidfile = "run/p.pid"
        control_socket = "run/p.sock"
        python_path = ["{BENCH}"]
        agent_check = "{f"tcp://{ip}:0" if agent else ""}"
        [log]
        format = "json"
        level = "info"
        [[service]]
        name = "pingpong"
        listen = ["tcp://{ip}:0"]
        handler = "pingpong:handle"
        workers = 4
        proxy_protocol = {"true" if proxy else "false"}
    '''))
    log = open(d / "log.json", "w+")
    p = PROCS.start([str(PY), "-m", "preforkd", "run", "-c", str(cfg)], cwd=d, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    port = agent_port = None
    while time.monotonic() < deadline:
        log.seek(0)
        events = [json.loads(line) for line in log if line.startswith("{")]
        for e in events:
            if e.get("event") == "listener.bound":
                if e.get("role") == "agent_check":
                    agent_port = int(e["address"].rpartition(":")[2])
                else:
                    port = int(e["address"].rpartition(":")[2])
        if any(e.get("event") == "supervisor.ready" for e in events):
            assert port is not None
            return p.pid, port, agent_port
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not start")


def haproxy(workdir: Path, servers: Dict[str, Tuple[str, int, int]]) -> Tuple[int, int]:
    """HAProxy with docs/scale-out.md's configuration; returns (pid, frontend port)."""
    text = (ROOT / "docs" / "scale-out.md").read_text()
    cfg = re.search(r"```haproxy\n(.*?)```", text, re.S).group(1)  # type: ignore[union-attr]
    front = socket.socket()
    front.bind(("127.0.0.1", 0))
    front.listen(1024)
    cfg = re.sub(r"(?m)^(\s*bind\s+)\S+", rf"\g<1>fd@{front.fileno()}", cfg)
    cfg = re.sub(r"(?m)^(\s*stats socket\s+)\S+", rf"\g<1>{workdir}/hp.sock", cfg)
    cfg = re.sub(r"(?m)^\s*log .*$", "", cfg)  # no per-connection log lines in a benchmark
    cfg = re.sub(r"(?m)^\s*option tcplog$", "", cfg)
    lines = [ln for ln in cfg.splitlines() if not re.match(r"\s*server\s", ln)]
    lines += [f"    server {n} {ip}:{port} agent-port {ap}" for n, (ip, port, ap) in servers.items()]
    path = workdir / f"haproxy-{len(servers)}.cfg"
    path.write_text("\n".join(lines) + "\n")
    p = PROCS.start([HAPROXY, "-db", "-f", str(path)], pass_fds=[front.fileno()], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    port = front.getsockname()[1]
    front.close()
    # ready once every server is up and weighted
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(f"{workdir}/hp.sock")
                s.sendall(b"show servers state preforkd\n")
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            rows = [r.split() for r in out.decode().splitlines() if len(r.split()) > 8 and r[0].isdigit()]
            if len(rows) == len(servers) and all(r[5] == "2" for r in rows):
                return p.pid, port
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("haproxy did not come up")


def cell(port: int, payload: bytes, seconds: float, pids: List[int], hp_pid: Optional[int]) -> dict:
    argv = [str(LOADGEN), "-m", "short", "-p", str(port), "-c", "4", "-d", f"{seconds:g}", "-S", "64",
            "-P", escape(payload + b"PING\r\n")]
    c0 = sum(tree_cpu(p) for p in pids)
    h0 = tree_cpu(hp_pid) if hp_pid else 0.0
    load0 = os.getloadavg()[0]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    c1 = sum(tree_cpu(p) for p in pids)
    h1 = tree_cpu(hp_pid) if hp_pid else 0.0
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    res = json.loads(out.stdout)
    ok = res["ok"]
    errors = sum(res.get(k, 0) for k in ("refused", "reset", "wrong", "timeout", "other"))
    return {"rate": res["rate"], "cpu_us": (c1 - c0) / ok * 1e6 if ok else float("nan"),
            "hp_cpu_us": (h1 - h0) / ok * 1e6 if ok and hp_pid else 0.0, "errors": errors, "load": load0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    if not LOADGEN.exists() or not os.path.exists(HAPROXY):
        print("needs benchmarks/build/loadgen (bash benchmarks/setup.sh) and haproxy", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="preforkd-scaleout-"))
    try:
        plain = preforkd(workdir, "plain", "127.0.0.1", proxy=False, agent=False)
        proxied = preforkd(workdir, "proxied", "127.0.0.1", proxy=True, agent=False)
        hosts = {f"host{i}": preforkd(workdir, f"host{i}", f"127.0.0.{i}", proxy=True, agent=True) for i in (2, 3, 4)}
        servers = {n: (f"127.0.0.{n[-1]}", port, ap_) for n, (_, port, ap_) in hosts.items()}
        assert all(ap_ is not None for _, _, ap_ in servers.values())
        hp3 = haproxy(workdir, servers)  # type: ignore[arg-type]
        solo_dir = workdir / "solo"
        solo_dir.mkdir()
        hp1 = haproxy(solo_dir, {"host2": servers["host2"]})  # type: ignore[dict-item]
        host_pids = [pid for pid, _, _ in hosts.values()]
        arms = {
            "W1 direct": lambda: cell(plain[1], b"", args.seconds, [plain[0]], None),
            "W1 + PROXY v2": lambda: cell(proxied[1], V2, args.seconds, [proxied[0]], None),
            "W1 + PROXY v1": lambda: cell(proxied[1], V1, args.seconds, [proxied[0]], None),
            "HAProxy → 3": lambda: cell(hp3[1], b"", args.seconds, host_pids, hp3[0]),
            "HAProxy → 1": lambda: cell(hp1[1], b"", args.seconds, [host_pids[0]], hp1[0]),
        }
        results: Dict[str, List[dict]] = {k: [] for k in arms}
        names = list(arms)
        for run in range(args.runs):
            order = names[run % len(names):] + names[:run % len(names)]
            for name in order:
                results[name].append(arms[name]())
                r = results[name][-1]
                print(f"run {run + 1} {name}: {r['rate']:.0f}/s, {r['cpu_us']:.1f} µs/conn, "
                      f"haproxy {r['hp_cpu_us']:.1f} µs/conn, errors {r['errors']}, load {r['load']:.2f}",
                      file=sys.stderr, flush=True)
        report(results, args)
    finally:
        PROCS.stop_all()
    return 0


def report(results: Dict[str, List[dict]], args: argparse.Namespace) -> None:
    def med(name: str, key: str) -> str:
        vals = [r[key] for r in results[name]]
        return f"{statistics.median(vals):,.1f} ({min(vals):,.1f}–{max(vals):,.1f})"

    def ratio(a: str, b: str, key: str) -> str:
        vals = [x[key] / y[key] for x, y in zip(results[a], results[b], strict=True)]
        return f"{statistics.median(vals):.2f}× ({min(vals):.2f}–{max(vals):.2f})"

    loads = [r["load"] for v in results.values() for r in v]
    print(f"\n{args.runs} runs of {args.seconds:g} s cells, interleaved; median (min–max); "
          f"ratios per run, then their median (min–max); load average at the cells "
          f"{min(loads):.1f}–{max(loads):.1f}\n")
    print("| arm | conn/s | preforkd CPU µs/conn | HAProxy CPU µs/conn | errors |")
    print("|---|---|---|---|---|")
    for name in results:
        print(f"| {name} | {med(name, 'rate')} | {med(name, 'cpu_us')} | "
              f"{med(name, 'hp_cpu_us') if 'HAProxy' in name else '–'} | {sum(r['errors'] for r in results[name])} |")
    print()
    print(f"- PROXY v2, rate: {ratio('W1 + PROXY v2', 'W1 direct', 'rate')}; "
          f"CPU per connection: {ratio('W1 + PROXY v2', 'W1 direct', 'cpu_us')}")
    print(f"- PROXY v1, rate: {ratio('W1 + PROXY v1', 'W1 direct', 'rate')}; "
          f"CPU per connection: {ratio('W1 + PROXY v1', 'W1 direct', 'cpu_us')}")
    print(f"- HAProxy → 3 instances vs 1 instance direct, rate: {ratio('HAProxy → 3', 'W1 direct', 'rate')}")
    print(f"- HAProxy → 1 instance vs 1 instance direct, rate: {ratio('HAProxy → 1', 'W1 direct', 'rate')}")
    print(f"- HAProxy → 3 vs HAProxy → 1, rate: {ratio('HAProxy → 3', 'HAProxy → 1', 'rate')}")


if __name__ == "__main__":
    sys.exit(main())
