"""A tested deployment: the real HAProxy in front of three preforkd "hosts".

Three preforkd instances bound to 127.0.0.2, 127.0.0.3 and 127.0.0.4 stand for three
hosts; HAProxy (Debian's ``haproxy``, installed by tests/install-tools.sh) balances
them with ``send-proxy-v2`` and ``agent-check``. The haproxy.cfg is the one in
docs/scale-out.md, read from there: the test only puts in the addresses and ports it
got, so the documented file is the tested file.

Ports: nothing is fixed. Each preforkd binds port 0 and logs what it got
(``listener.bound``), before HAProxy's configuration is written. HAProxy's frontend
is a socket this test binds (127.0.0.1:0) and passes to it as an inherited
descriptor (``bind fd@N``), the way unicorn's tests hand their server fd 3: it is
listening before HAProxy starts, so there is no window in which another process
could take the port, and no port to read back. Its runtime API is a Unix socket in
the test's directory. HAProxy is stopped by its PID at teardown, pass or fail.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Tuple

import psutil
import pytest

from conftest import ROOT, Load, connect, recv_until, run_cli, wait_for

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (tests/install-tools.sh installs it)")

HOSTS = {"host2": "127.0.0.2", "host3": "127.0.0.3", "host4": "127.0.0.4"}

APP = '''
import os

from preforkd import LineHandler


class App(LineHandler):
    """Echo; "whoami" answers with the client address this host sees and its name."""

    def on_line(self, line):
        if line == "whoami":
            return f"{self.conn.peer} {os.environ.get('SCALEOUT_HOST', '?')}"
        return line
'''


def documented_haproxy_cfg() -> str:
    """The haproxy.cfg block of docs/scale-out.md."""
    text = (ROOT / "docs" / "scale-out.md").read_text()
    m = re.search(r"```haproxy\n(.*?)```", text, re.S)
    assert m, "docs/scale-out.md has no ```haproxy block"
    return m.group(1)


def haproxy_cfg(frontend_fd: int, stats: Path, servers: Dict[str, Tuple[str, int, int]]) -> str:
    """The documented configuration with this test's frontend socket, runtime API
    socket and servers' addresses and ports put in."""
    cfg = documented_haproxy_cfg()
    cfg, n = re.subn(r"(?m)^(\s*bind\s+)\S+", rf"\g<1>fd@{frontend_fd}", cfg)
    assert n == 1
    cfg, n = re.subn(r"(?m)^(\s*stats socket\s+)\S+", rf"\g<1>{stats}", cfg)
    assert n == 1
    for name, (host, port, agent_port) in servers.items():
        cfg, n = re.subn(rf"(?m)^(\s*server\s+{name}\s+)\S+(.*agent-port\s+)\d+",
                         rf"\g<1>{host}:{port}\g<2>{agent_port}", cfg)
        assert n == 1, name
    return cfg


class HAProxy:
    """``haproxy -db`` on a frontend socket bound here; stopped by PID."""

    def __init__(self, directory: Path, servers: Dict[str, Tuple[str, int, int]]) -> None:
        self.frontend = socket.socket()
        self.frontend.bind(("127.0.0.1", 0))
        self.frontend.listen(1024)
        self.addr = self.frontend.getsockname()
        self.stats = directory / "haproxy.sock"
        self.cfg = directory / "haproxy.cfg"
        self.cfg.write_text(haproxy_cfg(self.frontend.fileno(), self.stats, servers))
        self.log = directory / "haproxy.log"
        assert HAPROXY is not None
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.cfg)], capture_output=True, text=True,
                               pass_fds=[self.frontend.fileno()])
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.cfg)], pass_fds=[self.frontend.fileno()],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.servers(), message="haproxy's runtime API")

    def api(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats))
            s.sendall(command.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def servers(self) -> Dict[str, Dict[str, int]]:
        """``show servers state``: per server its operational state (``op``: 2 up,
        0 down), administrative state (``admin``: 0 ready; the agent's drain sets a bit)
        and current weight (``weight``, after the agent's percentage)."""
        out = {}
        for line in self.api("show servers state preforkd").splitlines():
            f = line.split()
            if len(f) > 8 and f[1] == "preforkd":
                out[f[3]] = {"op": int(f[5]), "admin": int(f[6]), "weight": int(f[7])}
        return out

    def all_up(self, full: bool = True) -> bool:
        """Every host up and ready (not drained); *full*: at weight 100 too (an idle
        farm: under load the agent's weights follow the hosts' spare capacity)."""
        st = self.servers()
        return all(st.get(n, {}).get("op") == 2 and st[n]["admin"] == 0 and (st[n]["weight"] == 100 or not full)
                   for n in HOSTS)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.frontend.close()


@pytest.fixture
def haproxy(tmp_path):
    """Factory: ``haproxy(servers)``; every one started is stopped by PID at teardown."""
    started: List[HAProxy] = []

    def start(servers: Dict[str, Tuple[str, int, int]]) -> HAProxy:
        hp = HAProxy(tmp_path, servers)
        started.append(hp)
        return hp

    yield start
    for hp in started:
        hp.stop()


def host_config(ip: str, port: int = 0, agent_port: int = 0, workers: int = 3, drain_delay: float = 0) -> str:
    return textwrap.dedent(f'''
        [supervisor]
        pidfile = "run/preforkd.pid"
        control_socket = "run/preforkd.sock"
        graceful_timeout = 10
        python_path = [".."]
        agent_check = "tcp://{ip}:{agent_port}"
        drain_delay = {drain_delay}

        [[service]]
        name = "app"
        listen = ["tcp://{ip}:{port}"]
        handler = "scaleapp:App"
        workers = {workers}
        proxy_protocol = true
    ''')


def bound(sv, role: str) -> int:
    ev = [e for e in sv.log.find("listener.bound") if e.get("role") == role][-1]
    return int(ev["address"].rpartition(":")[2])


class Farm:
    """Three preforkd hosts and HAProxy in front of them."""

    def __init__(self, supervisor, haproxy, tmp_path: Path, **host_kw) -> None:
        (tmp_path / "scaleapp.py").write_text(APP)
        self.supervisor, self.tmp_path, self.host_kw = supervisor, tmp_path, host_kw
        self.hosts = {}
        self.ports: Dict[str, Tuple[str, int, int]] = {}
        for name, ip in HOSTS.items():
            sv = self.start_host(name, ip, 0, 0)
            self.ports[name] = (ip, bound(sv, "service"), bound(sv, "agent_check"))
        self.hp = haproxy(self.ports)
        wait_for(self.hp.all_up, message="every host up at weight 100 in HAProxy")

    def start_host(self, name: str, ip: str, port: int, agent_port: int):
        directory = self.tmp_path / name
        directory.mkdir(exist_ok=True)
        sv = self.supervisor(host_config(ip, port, agent_port, **self.host_kw), directory=directory,
                             env={"SCALEOUT_HOST": name})
        self.hosts[name] = sv
        return sv

    def restart_host(self, name: str):
        """Start *name* again on the ports HAProxy knows it by (a host's ports are fixed)."""
        ip, port, agent_port = self.ports[name]
        return self.start_host(name, ip, port, agent_port)

    def rejected(self) -> List[dict]:
        return [e for sv in self.hosts.values() for e in sv.log.find("proxy.rejected")]


def whoami(addr, source: str) -> Tuple[str, Tuple[str, int]]:
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((source, 0))
        s.connect(addr)
        s.sendall(b"whoami\n")
        return recv_until(s).decode().strip(), s.getsockname()


def test_handlers_see_the_client_address_and_a_saturated_host_loses_weight(supervisor, haproxy, tmp_path):
    farm = Farm(supervisor, haproxy, tmp_path, workers=2)
    # the client connects from its own loopback address; every host sees it, port included
    seen = set()
    for source in ("127.0.0.9", "127.0.0.10") * 3:
        reply, me = whoami(farm.hp.addr, source)
        peer, host = reply.split()
        assert peer == f"{me[0]}:{me[1]}", reply
        seen.add(host)
    assert seen == set(HOSTS)  # round robin: all three served
    assert farm.rejected() == []  # HAProxy's health checks (PROXY v2 LOCAL) are accepted quietly
    # host2 saturated: both its workers held by clients; its agent weight drops to 1%
    ip, port, _ = farm.ports["host2"]
    held = []
    for i in range(2):
        s = connect((ip, port))
        s.sendall(b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 7000\r\nhold %d\n" % i)
        assert recv_until(s) == b"hold %d\r\n" % i
        held.append(s)
    st = wait_for(lambda: (lambda st: st if st["host2"]["weight"] == 1 else None)(farm.hp.servers()),
                  message="host2's weight at 1")
    assert st["host3"]["weight"] == st["host4"]["weight"] == 100
    for s in held:
        s.close()
    wait_for(farm.hp.all_up, message="host2 back at weight 100")


def test_rolling_reload_then_rolling_restart_under_load_lose_no_connection(supervisor, haproxy, tmp_path):
    """Continuous load through HAProxy (short connections, and long ones that exchange
    a line every few ms): a rolling reload of the three hosts, then host3 stopped (TERM,
    drain_delay 2 s: the agent says drain, HAProxy moves new clients away, host3 keeps
    serving what it has) and started again. Not one connection is refused, reset or
    answered wrongly."""
    farm = Farm(supervisor, haproxy, tmp_path, workers=3, drain_delay=2)
    with Load(farm.hp.addr, short=3, long=3) as load:
        wait_for(lambda: load.counts["short_ok"] > 50, message="load flowing")
        for sv in farm.hosts.values():
            res = run_cli("reload", "-c", str(sv.config))
            assert res.returncode == 0, res.stderr
            assert sv.status()["generation"] == 2
        before = load.counts["short_ok"]
        wait_for(lambda: load.counts["short_ok"] > before + 50, message="load after the reloads")
        # rolling stop-and-start of host3
        old = farm.hosts["host3"]
        stopped_at = time.monotonic()
        res = run_cli("stop", "-c", str(old.config))
        assert res.returncode == 0, res.stderr
        assert old.wait_exit(30) == 0
        assert old.log.find("supervisor.draining", reason="SIGTERM")
        wait_for(lambda: farm.hp.servers()["host3"]["op"] == 0, message="HAProxy sees host3 down")
        farm.restart_host("host3")
        wait_for(lambda: farm.hp.all_up(full=False), message="host3 back up and ready")
        wait_for(lambda: load.all_long_started_after(stopped_at), message="long connections across the restart")
        before = load.counts["short_ok"]
        wait_for(lambda: load.counts["short_ok"] > before + 50, message="load after the restart")
    counts = dict(load.counts)
    print(f"\nrolling reload + restart through HAProxy: {counts}")
    assert load.bad() == {}, load.failures
    assert counts["long_ok"] > 0 and counts["short_ok"] > 0
    served = {name: sum(w["connections"] for s in sv.status()["services"] for w in s["workers"])
              for name, sv in farm.hosts.items()}
    assert all(served.values()), served  # every host took part, host3's new instance too


def test_a_host_killed_with_kill_9_costs_only_the_connections_it_held(supervisor, haproxy, tmp_path):
    """host4's master and workers all get SIGKILL (a host lost). Clients whose
    connection host4 held see it cut (reset or truncated); every other connection,
    new ones included (HAProxy's retries and redispatch send them elsewhere), is
    served: no refusal, no timeout."""
    farm = Farm(supervisor, haproxy, tmp_path, workers=3)
    sv = farm.hosts["host4"]
    with Load(farm.hp.addr, short=3, long=3) as load:
        wait_for(lambda: load.counts["short_ok"] > 50, message="load flowing")
        victims = [sv.pid] + sv.children()
        held = sum(w["active"] for s in sv.status()["services"] for w in s["workers"])
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: all(_gone(p) for p in victims), message="host4 gone")
        wait_for(lambda: farm.hp.servers()["host4"]["op"] == 0, message="HAProxy sees host4 down")
        before = load.counts["short_ok"]
        wait_for(lambda: load.counts["short_ok"] > before + 100, message="load after the kill")
    cut = {k: v for k, v in load.bad().items() if k != "long_failed"}  # long_failed: the long ones among them
    print(f"\nkill -9 of host4 (holding about {held} connections): {dict(load.counts)}")
    assert set(cut) <= {"reset", "truncated"}, load.failures
    assert sum(cut.values()) <= 6, load.failures  # at most one connection in flight per client thread


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
