"""`preforkd start`/`stop`/`status`: daemonizing, pidfile, socket files, start-up errors."""

import fcntl
import json
import os
import pty
import select
import signal
import socket
import stat
import subprocess
import termios
import textwrap
import time

import psutil
import pytest

from conftest import PREFORKD, ROOT, connect, exchange, pid_gone, recv_all, recv_until, run_cli, wait_for


@pytest.fixture
def daemon(tmp_path):
    """Factory writing a config and running `preforkd start`; stops what it started by PID."""
    started = []

    def start(body, expect_ok=True, on_terminal=False):
        cfg = tmp_path / "preforkd.toml"
        cfg.write_text(textwrap.dedent(body))
        args = ("start", "-c", str(cfg), "--timeout", "30")
        res = start_on_a_terminal(args, tmp_path) if on_terminal else run_cli(*args, cwd=tmp_path)
        pidfile = tmp_path / "run" / "preforkd.pid"
        if res.returncode == 0 and pidfile.exists():
            pid = int(pidfile.read_text())
            started.append(pid)
            started.extend(c.pid for c in psutil.Process(pid).children(recursive=True))
        if expect_ok:
            assert res.returncode == 0, res.stderr
        return res, cfg

    yield start
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_on_a_terminal(args, cwd):
    """Run ``preforkd ARGS`` as an operator's shell would: in a session of its own
    whose controlling terminal is a new pseudo-terminal (stdin, stdout and stderr on
    it). Returns a CompletedProcess whose stdout holds what appeared on the terminal."""
    try:
        master, slave = pty.openpty()
    except OSError:  # no pseudo-terminals here: launch without one
        result = run_cli(*args, cwd=cwd)
        result.launcher_pid = None
        return result
    try:
        proc = subprocess.Popen(PREFORKD + list(args), cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                                start_new_session=True,
                                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    finally:
        os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            chunk = b""
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: nobody holds the terminal any more
                    pass
            out += chunk
            if not chunk and proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    text = out.decode("utf-8", "replace")
    result = subprocess.CompletedProcess(proc.args, proc.wait(10), text, text)
    result.launcher_pid = proc.pid  # the leader of the terminal's session
    return result


BASE = '''
[supervisor]
pidfile = "run/preforkd.pid"
control_socket = "run/preforkd.sock"
graceful_timeout = 5
working_directory = "{wd}"
umask = "027"
[log]
format = "json"
file = "log/preforkd.log"
[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:0", "unix:run/echo.sock"]
workers = 2
'''


def status(cfg):
    res = run_cli("status", "--json", "-c", str(cfg))
    return res.returncode, (json.loads(res.stdout) if res.stdout.strip() else {})


def tcp_of(st, service="echo"):
    for svc in st["services"]:
        if svc["name"] == service:
            for lst in svc["listeners"]:
                if lst["address"].startswith("tcp://"):
                    host, _, port = lst["address"][6:].rpartition(":")
                    return host, int(port)
    raise AssertionError("no tcp listener")


def test_start_detaches_and_stop_cleans_up(daemon, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    res, cfg = daemon(BASE.format(wd=wd), on_terminal=True)  # launched from a terminal
    assert "started, master pid" in res.stdout
    pid = int((tmp_path / "run" / "preforkd.pid").read_text())
    proc = psutil.Process(pid)
    assert os.getsid(pid) not in (os.getsid(0), res.launcher_pid)  # a new session: not ours, not the launcher's
    assert os.getsid(pid) != pid  # and not its leader: it can never get a terminal back
    assert proc.terminal() is None  # though the launcher had one
    assert proc.cwd() == str(wd)
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    assert proc.ppid() == 1 or psutil.Process(proc.ppid()).name() != "python"
    log = tmp_path / "log" / "preforkd.log"
    assert stat.S_IMODE(os.stat(log).st_mode) & 0o007 == 0  # umask 027 applied
    assert stat.S_IMODE(os.stat(tmp_path / "run" / "preforkd.pid").st_mode) == 0o640  # 0644 under umask 022
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(tmp_path / "run" / "preforkd.sock").st_mode) == 0o600
    rc, st = status(cfg)
    assert rc == 0 and st["pid"] == pid and len(st["services"][0]["workers"]) == 2
    workers = [w["pid"] for w in st["services"][0]["workers"]]
    assert exchange(tcp_of(st), b"daemon\n") == b"daemon\r\n"
    text = run_cli("status", "-c", str(cfg)).stdout
    assert f"master pid {pid}" in text and "worker #1" in text
    res = run_cli("stop", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert pid_gone(pid) and all(pid_gone(w) for w in workers)
    assert not (tmp_path / "run" / "preforkd.pid").exists()
    assert not (tmp_path / "run" / "echo.sock").exists()
    assert not (tmp_path / "run" / "preforkd.sock").exists()
    assert status(cfg)[0] == 3
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert "supervisor.ready" in events and events[-1] == "supervisor.stopped"


def test_second_start_refuses(daemon, tmp_path):
    body = BASE.format(wd=tmp_path)
    daemon(body)
    res, _ = daemon(body, expect_ok=False)
    assert res.returncode == 1
    assert "already running" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_stale_pidfile_dead_pid_and_reused_pid_are_replaced(daemon, tmp_path):
    (tmp_path / "run").mkdir()
    pidfile = tmp_path / "run" / "preforkd.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile.write_text(f"{dead.pid}\n")
    _, cfg = daemon(BASE.format(wd=tmp_path))
    pid = int(pidfile.read_text())
    assert pid != dead.pid
    assert run_cli("stop", "-c", str(cfg)).returncode == 0
    other = subprocess.Popen(["sleep", "60"])  # a live pid that is not preforkd
    try:
        pidfile.write_text(f"{other.pid}\n")
        daemon(BASE.format(wd=tmp_path))
        assert int(pidfile.read_text()) != other.pid
        assert other.poll() is None  # and it was left alone
        assert run_cli("stop", "-c", str(cfg)).returncode == 0
    finally:
        other.kill()
        other.wait()


def test_stale_unix_socket_is_replaced(supervisor, tmp_path):
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "echo.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # leaves the file behind, nobody listening
    supervisor('''
        [[service]]
        name = "echo"
        listen = ["unix:run/echo.sock"]
        workers = 1
    ''')
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(str(path))
        c.sendall(b"fresh\n")
        assert recv_until(c) == b"fresh\r\n"


@pytest.mark.parametrize("kind", ["live-server", "regular-file"])
def test_unix_path_in_use_or_not_a_socket_is_an_error_and_kept(tmp_path, kind):
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "echo.sock"
    holder = None
    if kind == "live-server":
        holder = socket.socket(socket.AF_UNIX)
        holder.bind(str(path))
        holder.listen()
    else:
        path.write_text("precious data\n")
    cfg = tmp_path / "preforkd.toml"
    cfg.write_text('[supervisor]\npidfile = "run/p.pid"\ncontrol_socket = "run/p.sock"\n'
                   '[log]\nformat = "json"\n[[service]]\nname = "echo"\nlisten = ["unix:run/echo.sock"]\n')
    try:
        res = run_cli("run", "-c", str(cfg), timeout=30)
        assert res.returncode == 1
        ev = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
        failed = [e for e in ev if e["event"] == "supervisor.start_failed"]
        assert failed and ("in use" in failed[0]["error"] or "not a socket" in failed[0]["error"])
        assert path.exists()
        if kind == "regular-file":
            assert path.read_text() == "precious data\n"
        assert not (tmp_path / "run" / "p.pid").exists()
    finally:
        if holder:
            holder.close()


def test_port_in_use_fails_start_and_run(daemon, tmp_path):
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    body = BASE.format(wd=tmp_path).replace("tcp://127.0.0.1:0", f"tcp://127.0.0.1:{port}")
    log = tmp_path / "log" / "preforkd.log"
    try:
        res, cfg = daemon(body, expect_ok=False)
        assert res.returncode == 1
        assert f"127.0.0.1:{port}" in res.stderr and "in use" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "run" / "preforkd.pid").exists()
        assert log.read_text().count("supervisor.start_failed") == 1
        run = run_cli("run", "-c", str(cfg), timeout=30)
        assert run.returncode == 1
        assert log.read_text().count("supervisor.start_failed") == 2
        assert f"127.0.0.1:{port}" in log.read_text().splitlines()[-1]
    finally:
        blocker.close()
    assert not (tmp_path / "run" / "preforkd.pid").exists()
    assert not (tmp_path / "run" / "echo.sock").exists()


def test_start_fails_when_workers_cannot_start(daemon, tmp_path):
    (tmp_path / "dbdown.py").write_text(
        "import preforkd\n"
        "class H(preforkd.LineHandler):\n"
        "    @classmethod\n"
        "    def worker_init(cls):\n"
        "        raise OSError('cannot reach the database')\n")
    body = BASE.format(wd=tmp_path).replace("graceful_timeout = 5", 'graceful_timeout = 5\npython_path = ["."]')
    body += 'handler = "dbdown:H"\n'
    res, _ = daemon(body, expect_ok=False)
    assert res.returncode == 1
    assert "workers exit at start-up" in res.stderr
    wait_for(lambda: not (tmp_path / "run" / "preforkd.pid").exists(), message="the daemon to stop")


def test_status_and_stop_when_not_running(tmp_path):
    cfg = tmp_path / "preforkd.toml"
    cfg.write_text(BASE.format(wd=tmp_path))
    assert run_cli("status", "-c", str(cfg)).returncode == 3
    assert "not running" in run_cli("status", "-c", str(cfg)).stdout
    assert run_cli("stop", "-c", str(cfg)).returncode == 0


def test_command_service_interactive_example(supervisor, tmp_path):
    sv = supervisor(f'''
        [[service]]
        name = "interactive"
        listen = ["tcp://127.0.0.1:0"]
        command = ["{ROOT / "examples" / "interactive.py"}"]
        workers = 1
        idle_timeout = 20
    ''')
    with connect(sv.tcp("interactive")) as s:
        assert recv_until(s, b"Command? ").startswith(b"Welcome, 127.0.0.1")
        s.sendall(b"help\r\n")
        helptext = recv_until(s, b"Command? ")
        assert b"date" in helptext and b"quit" in helptext
        s.sendall(b"date\n")
        assert b"UTC" in recv_until(s, b"Command? ")
        s.sendall(b"quit\n")
        assert recv_all(s) == b"Bye.\r\n"


def test_command_outliving_idle_timeout_is_killed_with_its_group(supervisor, tmp_path):
    script = tmp_path / "hang.sh"
    script.write_text(f"#!/bin/sh\necho started\nsleep 300 &\necho $! > {tmp_path}/child.pid\nsleep 300\n")
    script.chmod(0o755)
    sv = supervisor(f'''
        [[service]]
        name = "hang"
        listen = ["tcp://127.0.0.1:0"]
        command = ["{script}"]
        workers = 1
        idle_timeout = 1
    ''')
    with connect(sv.tcp("hang"), timeout=20) as s:
        assert recv_until(s, b"\n") == b"started\n"
        assert recv_all(s) == b""  # the program was killed, the connection closed
    ev = sv.wait_event("command.timeout")
    assert not psutil.pid_exists(ev["child"]) or pid_gone(ev["child"])
    grandchild = int((tmp_path / "child.pid").read_text())
    wait_for(lambda: pid_gone(grandchild), timeout=10)


def test_stale_pidfile_naming_a_program_that_mentions_preforkd(daemon, tmp_path):
    """After a crash the pid may be reused by, say, ``tail -f preforkd.log``: that is
    not a running supervisor, must not be signalled, and the pidfile is replaced."""
    (tmp_path / "run").mkdir()
    (tmp_path / "preforkd.log").write_text("")
    pidfile = tmp_path / "run" / "preforkd.pid"
    tail = subprocess.Popen(["tail", "-f", str(tmp_path / "preforkd.log")], stdout=subprocess.DEVNULL)
    try:
        pidfile.write_text(f"{tail.pid}\n")
        cfg = tmp_path / "preforkd.toml"
        cfg.write_text(BASE.format(wd=tmp_path))
        res = run_cli("status", "-c", str(cfg))
        assert res.returncode == 3, res.stdout + res.stderr
        res = run_cli("stop", "-c", str(cfg))
        assert res.returncode == 0 and "not running" in res.stdout
        assert tail.poll() is None
        daemon(BASE.format(wd=tmp_path))
        assert int(pidfile.read_text()) != tail.pid
        assert run_cli("stop", "-c", str(cfg)).returncode == 0
        assert tail.poll() is None
    finally:
        tail.kill()
        tail.wait()


def test_start_again_after_the_master_was_killed(daemon, tmp_path):
    """kill -9 leaves the pidfile, the control socket and the Unix socket file behind:
    the next start replaces all three and serves."""
    body = BASE.format(wd=tmp_path)
    _, cfg = daemon(body)
    pid = int((tmp_path / "run" / "preforkd.pid").read_text())
    workers = [c.pid for c in psutil.Process(pid).children()]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid_gone(pid) and all(pid_gone(w) for w in workers), timeout=15)
    for name in ("preforkd.pid", "preforkd.sock", "echo.sock"):
        assert (tmp_path / "run" / name).exists()
    assert run_cli("status", "-c", str(cfg)).returncode == 3
    daemon(body)
    rc, st = status(cfg)
    assert rc == 0 and st["pid"] != pid
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(str(tmp_path / "run" / "echo.sock"))
        c.sendall(b"again\n")
        assert recv_until(c) == b"again\r\n"
    assert run_cli("stop", "-c", str(cfg)).returncode == 0


@pytest.mark.parametrize("how", ["quick-stop", "kill-9-master", "graceful-timeout"])
def test_command_program_does_not_outlive_the_supervisor(supervisor, tmp_path, how):
    """A command program runs in its own session: whatever ends its worker early (a
    quick stop, the master's death, graceful_timeout) must end its process group too."""
    script = tmp_path / "long.sh"
    script.write_text(f"#!/bin/sh\nsleep 300 &\necho $$ $! > {tmp_path}/pids\necho started\nwait\n")
    script.chmod(0o755)
    sv = supervisor(f'''
        [supervisor]
        pidfile = "run/p.pid"
        control_socket = "run/p.sock"
        graceful_timeout = 1
        [[service]]
        name = "long"
        listen = ["tcp://127.0.0.1:0"]
        command = ["{script}"]
        workers = 1
        idle_timeout = 120
    ''')
    with connect(sv.tcp("long"), timeout=30) as s:
        assert recv_until(s, b"\n") == b"started\n"
        program, grandchild = (int(p) for p in (tmp_path / "pids").read_text().split())
        try:
            sv.signal({"quick-stop": signal.SIGINT, "kill-9-master": signal.SIGKILL,
                       "graceful-timeout": signal.SIGTERM}[how])
            sv.wait_exit()
            wait_for(lambda: pid_gone(program) and pid_gone(grandchild), timeout=10,
                     message="the command program and its child to be gone")
            assert recv_all(s) == b""
        finally:
            for pid in (program, grandchild):
                if not pid_gone(pid):
                    os.kill(pid, signal.SIGKILL)
