"""Hostile neighbours, hangs and leaks (issue 9): real daemons, real users, real races.

Each test plays what an operator or a hostile local user did to preforkd and failed:
a log rotation with privileges dropped, start-up errors logged only to a file, a FIFO
or a huge file as the configuration, symlinks planted where preforkd creates files,
runtime directories owned or writable by someone else, a symlink renamed over a Unix
socket between ``bind`` and ``chown``, a stale pidfile naming another instance, PID
namespaces, a ``command`` program whose child leaves its session, and the control
socket at the descriptor limit or with many clients at once.

The other-user cases run as root and create their own users (``useradd``, removed
afterwards); they, and the PID namespace cases (``unshare``), skip cleanly where that
is not possible.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import pwd
import resource
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import psutil
import pytest

from conftest import PREFORKD, connect, pid_gone, recv_all, recv_until, run_cli, wait_for, write_config

ECHO = '''
    [[service]]
    name = "echo"
    listen = ["tcp://127.0.0.1:0"]
    workers = {workers}
'''

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (other users, chown, namespaces)")


# -- helpers ----------------------------------------------------------------------------


@pytest.fixture
def make_user() -> Iterator[Any]:
    """Factory: ``make_user()`` creates a system user (no home, no login shell) and
    returns its passwd entry; every user made is deleted at teardown."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("creating users needs root and useradd")
    made: List[str] = []

    def add(name: str) -> bool:
        res = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                             capture_output=True, text=True)
        if res.returncode != 0 and "lock" not in res.stderr:  # another engineer's useradd holds the lock
            pytest.skip(f"useradd failed: {res.stderr.strip()}")
        return res.returncode == 0

    def make() -> pwd.struct_passwd:
        name = "pfh" + secrets.token_hex(4)
        wait_for(lambda: add(name), timeout=30, interval=0.2, message=f"useradd {name}")
        made.append(name)
        return pwd.getpwnam(name)

    def remove(name: str) -> bool:
        code = subprocess.run(["userdel", name], capture_output=True).returncode
        if code == 8:  # still running processes: the supervisor fixture, torn down next, ends them
            code = subprocess.run(["userdel", "--force", name], capture_output=True).returncode
        return code in (0, 6)  # 6: no such user

    yield make
    for name in made:
        wait_for(lambda n=name: remove(n), timeout=30, interval=0.2, message=f"userdel {name}")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can reach (mode 0755 under /tmp; pytest's own temporary
    directories are private to root), removed at teardown."""
    path = Path(tempfile.mkdtemp(prefix="preforkd-hostile-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def file_events(path: Path) -> List[Dict[str, Any]]:
    """The JSON events in a log file (what is there so far)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def named(events: List[Dict[str, Any]], name: str) -> List[Dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


def status_doc(sock: Path) -> Dict[str, Any]:
    """The master's status document straight from its control socket."""
    from preforkd.control import query_status

    return query_status(str(sock), timeout=10)


def tcp_address(st: Dict[str, Any], service: str = "echo") -> Tuple[str, int]:
    for svc in st["services"]:
        if svc["name"] == service:
            for lst in svc["listeners"]:
                if lst["address"].startswith("tcp://"):
                    host, _, port = lst["address"][len("tcp://"):].rpartition(":")
                    return host.strip("[]"), int(port)
    raise AssertionError(f"no tcp listener for {service}")


def cli_as(user: pwd.struct_passwd, *args: str, timeout: int = 60) -> Tuple[int, str, str]:
    """Run preforkd's command line (``preforkd ARGS``) as *user*, without
    ``XDG_RUNTIME_DIR``, in a forked child of this process that has dropped to that
    user: the interpreter itself may not be reachable for it (e.g. under /root), so
    everything the command needs is imported before the privileges go.

    :returns: ``(exit status, stdout, stderr)``.
    """
    import preforkd
    import preforkd.cli

    for module in pkgutil.iter_modules(preforkd.__path__):  # all loaded before the privileges go
        if module.name != "__main__":
            importlib.import_module(f"preforkd.{module.name}")

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            signal.alarm(timeout)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the child's whole life
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            os.environ.pop("XDG_RUNTIME_DIR", None)
            os.chdir("/")
            code = preforkd.cli.main(list(args))
        except BaseException:  # noqa: BLE001 - reported through stderr
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    with os.fdopen(out_r) as out, os.fdopen(err_r) as err:
        stdout, stderr = out.read(), err.read()
    _, wstatus = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wstatus), stdout, stderr


# -- 1. USR1 with privileges dropped ----------------------------------------------------


@needs_root
def test_usr1_with_privileges_dropped_costs_no_worker_and_moves_everyone(supervisor, make_user, shared_dir):
    """With ``supervisor.user`` and ``log.file``, a rotation used to kill every worker
    (the dropped user could not reopen the root-owned file). Two rotations, one where
    preforkd creates the new file and one where logrotate did (``create 0640 root``):
    no worker dies, and afterwards every process writes to the new file."""
    user = make_user()
    sv = supervisor(f'''
        [supervisor]
        pidfile = "run/p.pid"
        control_socket = "run/p.sock"
        user = "{user.pw_name}"
        [log]
        format = "json"
        level = "debug"
        file = "logs/preforkd.log"
        {ECHO.format(workers=3)}
        max_line_length = 8
    ''', ready=False, directory=shared_dir)
    log = shared_dir / "logs" / "preforkd.log"
    wait_for(lambda: named(file_events(log), "supervisor.ready"), message="supervisor.ready in the log file")
    st = status_doc(shared_dir / "run" / "p.sock")
    workers = sorted(w["pid"] for w in st["services"][0]["workers"])
    sv.seen_pids.update(workers)
    assert all(psutil.Process(pid).uids().real == user.pw_uid for pid in workers)

    for rotation in (1, 2):
        os.rename(log, f"{log}.{rotation}")
        if rotation == 2:  # logrotate's `create 0640 root root` made the new file first
            os.close(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        sv.signal(signal.SIGUSR1)
        # the master (info) and each of the 3 workers (debug) reopen, into the new file
        wait_for(lambda: len(named(file_events(log), "log.reopened")) == 4, timeout=20,
                 message=f"4 log.reopened events after rotation {rotation}")
    addr = tcp_address(status_doc(shared_dir / "run" / "p.sock"))
    for _ in range(6):  # whichever workers take them, their events land in the new file
        with connect(addr) as s:
            s.sendall(b"far too long a line\n")
            assert recv_all(s).startswith(b"ERROR line too long")
    wait_for(lambda: len(named(file_events(log), "connection.line_too_long")) == 6)
    everything = file_events(log) + file_events(Path(f"{log}.1")) + file_events(Path(f"{log}.2"))
    assert not named(everything, "worker.crashed") and not named(everything, "worker.exited")
    assert not named(everything, "log.reopen_failed")
    assert sorted(w["pid"] for w in status_doc(shared_dir / "run" / "p.sock")["services"][0]["workers"]) == workers
    assert os.stat(log).st_uid == user.pw_uid  # made the workers' (as nginx does)
    sv.signal(signal.SIGTERM)
    assert sv.wait_exit() == 0
    assert named(file_events(log), "supervisor.stopped")


# -- 2. `run` with a log file: a failed start is a line on stderr too ---------------------


@pytest.mark.parametrize("cause", ["port-in-use", "pidfile-locked"])
def test_run_with_a_log_file_says_why_it_did_not_start(supervisor, tmp_path, cause):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))  # an ephemeral port, taken
    blocker.listen()
    port = blocker.getsockname()[1] if cause == "port-in-use" else 0
    try:
        body = f'''
            [log]
            format = "json"
            file = "logs/preforkd.log"
            [[service]]
            name = "echo"
            listen = ["tcp://127.0.0.1:{port}"]
            workers = 1
        '''
        log = tmp_path / "logs" / "preforkd.log"
        if cause == "pidfile-locked":
            supervisor(body, ready=False)
            wait_for(lambda: named(file_events(log), "supervisor.ready"), message="the first supervisor")
        cfg = write_config(tmp_path, body)
        res = run_cli("run", "-c", str(cfg), timeout=60)
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert lines[0].startswith("preforkd: start failed: ")
        if cause == "port-in-use":
            assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
        else:
            assert "already running" in lines[0] and "locked by pid" in lines[0]
        assert named(file_events(log), "supervisor.start_failed")  # and in the log, as before
    finally:
        blocker.close()


# -- 3. reading the configuration: regular files only, never blocking, bounded -----------


def test_hup_with_the_config_replaced_by_a_fifo_fails_the_reload(supervisor, tmp_path):
    """A FIFO at the configuration's path used to block the master in open() for good
    (no reaping, TERM ignored)."""
    sv = supervisor(ECHO.format(workers=1))
    os.unlink(sv.config)
    os.mkfifo(sv.config)
    sv.signal(signal.SIGHUP)
    ev = sv.wait_event("config.reload_failed", timeout=20)
    assert "not a regular file" in ev["error"]
    st = status_doc(tmp_path / "run" / "preforkd.sock")  # still answering, still serving
    assert st["reload"]["state"] == "failed" and st["generation"] == 1
    with connect(tcp_address(st)) as s:
        s.sendall(b"still here\n")
        assert recv_until(s) == b"still here\r\n"
    sv.signal(signal.SIGTERM)
    assert sv.wait_exit(20) == 0


def test_hup_with_an_oversized_config_fails_the_reload(supervisor):
    sv = supervisor(ECHO.format(workers=1))
    text = sv.config.read_text()
    padding = ("# " + "x" * 1021 + "\n") * 2048  # 2 MiB of comments: valid TOML, too big
    sv.config.write_text(text + padding)
    sv.signal(signal.SIGHUP)
    wait_for(lambda: sv.log.find("config.reload_failed") or sv.log.find("config.reloaded"), timeout=30,
             message="the reload's outcome")
    failed = sv.log.find("config.reload_failed")
    assert failed and "larger than 1048576 bytes" in failed[0]["error"]
    sv.config.write_text(text)  # a sane file reloads again
    sv.signal(signal.SIGHUP)
    sv.wait_event("config.reloaded", timeout=60)


@pytest.mark.parametrize("command", ["check", "run"])
def test_check_and_run_refuse_a_fifo_as_configuration(tmp_path, command):
    fifo = tmp_path / "preforkd.toml"
    os.mkfifo(fifo)
    res = run_cli(command, "-c", str(fifo), timeout=30)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [f"preforkd: {fifo}: cannot read: not a regular file"]


# -- 4. files preforkd creates: never through a symlink; runtime directories ------------


def test_pidfile_symlink_is_never_followed(supervisor, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "run").mkdir()
    os.symlink(victim, tmp_path / "run" / "preforkd.pid")
    sv = supervisor(ECHO.format(workers=1), ready=False)
    assert sv.wait_exit(30) == 1
    failed = sv.log.find("supervisor.start_failed")
    assert failed and "is a symbolic link" in failed[0]["error"] and "preforkd.pid" in failed[0]["error"]
    assert victim.read_text() == "precious\n"
    assert os.path.islink(tmp_path / "run" / "preforkd.pid")  # left alone


def test_log_file_symlink_is_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "logs").mkdir()
    os.symlink(victim, tmp_path / "logs" / "preforkd.log")
    cfg = write_config(tmp_path, ECHO.format(workers=1) + '[log]\nformat = "json"\nfile = "logs/preforkd.log"\n')
    proc = subprocess.Popen(PREFORKD + ["run", "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert err.strip().splitlines() == [f"preforkd: {cfg}: log.file: cannot open {tmp_path}/logs/preforkd.log: "
                                        "is a symbolic link (preforkd never opens its files through one)"]
    assert victim.read_text() == "precious\n"


def test_usr1_never_reopens_the_log_through_a_symlink(supervisor, tmp_path):
    """A symlink renamed over the log file before a rotation: the master refuses to
    follow it, keeps writing where it was, and lives on."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    sv = supervisor(ECHO.format(workers=2) + '[log]\nformat = "json"\nlevel = "debug"\nfile = "logs/p.log"\n',
                    ready=False)
    log = tmp_path / "logs" / "p.log"
    wait_for(lambda: named(file_events(log), "supervisor.ready"))
    os.rename(log, tmp_path / "logs" / "p.log.1")
    os.symlink(victim, log)
    sv.signal(signal.SIGUSR1)
    old = tmp_path / "logs" / "p.log.1"
    wait_for(lambda: named(file_events(old), "log.reopen_failed"), message="log.reopen_failed")
    assert "symbolic link" in named(file_events(old), "log.reopen_failed")[0]["error"]
    assert victim.read_text() == "precious\n"
    assert status_doc(tmp_path / "run" / "preforkd.sock")["state"] == "running"
    sv.signal(signal.SIGTERM)
    assert sv.wait_exit(20) == 0
    assert victim.read_text() == "precious\n"
    assert named(file_events(old), "supervisor.stopped")


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "parent-writable", "other-owner"])
def test_runtime_directory_must_be_ours_and_private(supervisor, tmp_path, request, how):
    run = tmp_path / "run"
    if how == "parent-writable":  # writable (not sticky) one level up: `run` could be swapped
        run = tmp_path / "shared" / "run"
        run.parent.mkdir()
        run.parent.chmod(0o777)
    run.mkdir()
    if how == "world-writable":
        run.chmod(0o777)
    elif how == "group-writable":
        run.chmod(0o770)
    elif how == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("chown to another user needs root")
        other = request.getfixturevalue("make_user")()
        os.chown(run, other.pw_uid, other.pw_gid)
    rel = run.relative_to(tmp_path)
    sv = supervisor(f'''
        [supervisor]
        pidfile = "{rel}/p.pid"
        control_socket = "{rel}/p.sock"
        {ECHO.format(workers=1)}
    ''', ready=False)
    assert sv.wait_exit(30) == 1
    failed = sv.log.find("supervisor.start_failed")
    assert failed, sv.log.text()
    error = failed[0]["error"]
    expected = {"world-writable": f"runtime directory {run} is writable by others",
                "group-writable": f"runtime directory {run} is writable by its group",
                "parent-writable": f"directory above the runtime directory {run.parent} is writable by others",
                "other-owner": f"runtime directory {run} is owned by uid "}[how]
    assert expected in error, error
    assert not (run / "p.pid").exists() and not (run / "p.sock").exists()


@needs_root
def test_default_runtime_dir_planted_by_another_user_is_not_trusted(make_user):
    """Without XDG_RUNTIME_DIR a user's default runtime directory is /tmp/preforkd-UID;
    another user who creates it first can serve invented status there. `status` and
    `stop` refuse it, in one line."""
    victim, attacker = make_user(), make_user()
    planted = Path(f"/tmp/preforkd-{victim.pw_uid}")
    planted.mkdir(mode=0o755)
    server = socket.socket(socket.AF_UNIX)
    try:
        os.chown(planted, attacker.pw_uid, attacker.pw_gid)
        server.bind(str(planted / "preforkd.sock"))
        os.chmod(planted / "preforkd.sock", 0o666)
        os.chown(planted / "preforkd.sock", attacker.pw_uid, attacker.pw_gid)
        server.listen()
        invented = {"pid": 4242, "state": "running", "generation": 7, "uptime": 1.0, "started": 0,
                    "config": "<built-in default>", "pidfile": None, "services": [],
                    "reload": {"seq": 0, "state": "none", "error": None}, "retiring_workers": []}

        def serve() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(1024)
                    conn.sendall(json.dumps(invented).encode() + b"\n")

        threading.Thread(target=serve, daemon=True).start()
        code, out, err = cli_as(victim, "status")
        assert code == 4, out + err
        assert "4242" not in out
        assert err.strip().splitlines() == [
            f"preforkd: pidfile {planted}/preforkd.pid: runtime directory {planted} is owned by uid "
            f"{attacker.pw_uid}, not by uid {victim.pw_uid} or root; not trusting it"]
        code, out, err = cli_as(victim, "stop")
        assert code == 1 and len(err.strip().splitlines()) == 1 and "not trusting it" in err
    finally:
        server.close()
        shutil.rmtree(planted, ignore_errors=True)


# -- 5. the owner and mode of a Unix socket file go on the inode we bound -----------------

RACE_HOOK = '''
"""Test hook: after bind(2) of a Unix socket whose path ends in race.sock, wait until
the test has swapped the path (it writes to the FIFO named in PREFORKD_TEST_RACE):
the race window between bind and chown, made as wide as the test needs."""
import os
import socket

_bind = socket.socket.bind


def bind(self, address):
    _bind(self, address)
    if isinstance(address, str) and address.endswith("race.sock"):
        with open(os.environ["PREFORKD_TEST_RACE"], "rb") as fifo:
            fifo.read()


socket.socket.bind = bind
'''


@needs_root
@pytest.mark.parametrize("swap", ["symlink", "other-socket"])
def test_socket_owner_and_mode_never_go_through_a_swapped_path(supervisor, tmp_path, make_user, swap):
    """Between the master's bind and its chown, the socket's path is replaced: by a
    symlink to a root-only file, or by another user's socket. The old code chmod'ed and
    chown'ed by name, handing the file over to the worker user."""
    worker_user, attacker = make_user(), make_user()
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(RACE_HOOK)
    fifo = tmp_path / "race.fifo"
    os.mkfifo(fifo)
    socks = tmp_path / "socks"
    socks.mkdir()
    path = socks / "race.sock"
    if swap == "symlink":
        victim = tmp_path / "secret"
        victim.write_text("root only\n")
        victim.chmod(0o600)
        planted = socks / ".swap"
        os.symlink(victim, planted)
        victim_owner = (0, 0o600)
    else:
        other = socket.socket(socket.AF_UNIX)
        old = os.umask(0o177)
        try:
            other.bind(str(socks / ".swap"))
        finally:
            os.umask(old)
        os.chown(socks / ".swap", attacker.pw_uid, attacker.pw_gid)
        victim = planted = socks / ".swap"
        victim_owner = (attacker.pw_uid, 0o600)
    try:
        sv = supervisor(f'''
            [supervisor]
            pidfile = "run/p.pid"
            control_socket = "run/p.sock"
            user = "{worker_user.pw_name}"
            [[service]]
            name = "echo"
            listen = ["unix:socks/race.sock"]
            workers = 1
            socket_mode = "0660"
        ''', ready=False, env={"PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
                               "PREFORKD_TEST_RACE": str(fifo)})
        wait_for(lambda: stat.S_ISSOCK(os.lstat(path).st_mode), message="the master to bind race.sock")
        st = os.lstat(victim)
        os.rename(planted, path)  # the hostile neighbour's move, inside the window
        with open(fifo, "wb") as f:
            f.write(b"go")
        wait_for(lambda: sv.proc.poll() is not None or sv.log.find("supervisor.ready"),
                 message="the master to finish starting, or give up")
        after = os.lstat(path if swap == "other-socket" else victim)
        assert (after.st_uid, stat.S_IMODE(after.st_mode)) == victim_owner, "handed over to the worker user"
        assert (after.st_dev, after.st_ino) == (st.st_dev, st.st_ino)
        assert sv.wait_exit(20) == 1
        failed = sv.log.find("supervisor.start_failed")
        assert failed and "race.sock: the socket file was replaced" in failed[0]["error"]
    finally:
        if swap == "other-socket":
            other.close()


def test_unix_socket_owner_is_set_on_the_bound_inode(supervisor, tmp_path, request):
    """The ordinary case still works: the socket file gets socket_mode and, as root
    with supervisor.user, that user as its owner."""
    user_line = ""
    if os.geteuid() == 0:
        user = request.getfixturevalue("make_user")()
        user_line = f'user = "{user.pw_name}"'
    supervisor(f'''
        [supervisor]
        pidfile = "run/p.pid"
        control_socket = "run/p.sock"
        {user_line}
        [[service]]
        name = "echo"
        listen = ["unix:socks/echo.sock"]
        workers = 1
        socket_mode = "0640"
    ''')
    st = os.lstat(tmp_path / "socks" / "echo.sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    if user_line:
        assert st.st_uid == user.pw_uid
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(str(tmp_path / "socks" / "echo.sock"))
        c.sendall(b"mine\n")
        assert recv_until(c) == b"mine\r\n"


# -- 6. stop and reload signal only the holder of the pidfile's lock ----------------------


def test_stop_and_reload_leave_alone_the_instance_a_stale_pidfile_names(supervisor, tmp_path):
    """A's pidfile is stale (nobody holds its lock) and names B's master: `stop -c A`
    used to stop B. After a reload (re-exec) B still holds its lock: `stop -c B` works."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    b = supervisor(ECHO.format(workers=1), directory=tmp_path / "b")
    cfg_a = write_config(tmp_path / "a", ECHO.format(workers=1))
    (tmp_path / "a" / "run").mkdir()
    (tmp_path / "a" / "run" / "preforkd.pid").write_text(f"{b.pid}\n")
    res = run_cli("stop", "-c", str(cfg_a), "--timeout", "5")
    assert res.returncode == 0 and res.stdout.strip() == "preforkd: not running", res.stdout + res.stderr
    res = run_cli("reload", "-c", str(cfg_a), "--timeout", "5")
    assert res.returncode == 1 and res.stderr.strip() == "preforkd: not running; nothing to reload"
    assert run_cli("status", "-c", str(cfg_a)).returncode == 3
    assert b.proc.poll() is None
    assert b.status()["generation"] == 1
    res = run_cli("reload", "-c", str(b.config))
    assert res.returncode == 0, res.stderr
    res = run_cli("stop", "-c", str(b.config))
    assert res.returncode == 0 and res.stdout.strip() == f"preforkd: stopped (pid {b.pid})", res.stderr
    assert b.wait_exit(10) == 0


def _unshare_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    res = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"],
                         capture_output=True, timeout=30)
    return res.returncode == 0


needs_pid_namespaces = pytest.mark.skipif(not _unshare_works(), reason="needs root and unshare --pid")
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


@needs_pid_namespaces
def test_stop_from_another_pid_namespace_refuses(supervisor):
    """From a PID namespace the master is not in, its pid means nothing (or someone
    else): `stop` must refuse, not report "not running" or signal a stranger."""
    sv = supervisor(ECHO.format(workers=1))
    res = subprocess.run(UNSHARE + PREFORKD + ["stop", "-c", str(sv.config), "--timeout", "5"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "outside this PID namespace" in lines[0]
    assert sv.proc.poll() is None
    assert sv.status()["state"] == "running"


DRIVER = '''
"""PID 1 of a fresh PID namespace N1: start a master in a nested namespace N2 (where it
is PID 1, and writes 1 into its pidfile), then run `preforkd stop` from N1, where PID 1
is this driver (which has no TERM handler, so a TERM sent to it is dropped)."""
import json, subprocess, sys, threading

cfg, python = sys.argv[1], sys.executable
master = subprocess.Popen(UNSHARE + [python, "-m", "preforkd", "run", "-c", cfg],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
for line in master.stderr:  # wait for readiness on the master's own events
    if '"supervisor.ready"' in line:
        break
threading.Thread(target=master.stderr.read, daemon=True).start()  # keep draining
pidfile = open(cfg.rsplit("/", 1)[0] + "/run/preforkd.pid").read().strip()
stop = subprocess.run([python, "-m", "preforkd", "stop", "-c", cfg, "--timeout", "20"],
                      capture_output=True, text=True)
try:
    code = master.wait(timeout=20)
except subprocess.TimeoutExpired:
    master.kill()
    code = None
print(json.dumps({"pidfile": pidfile, "rc": stop.returncode, "stdout": stop.stdout, "stderr": stop.stderr,
                  "master_exit": code}))
'''


@needs_pid_namespaces
def test_stop_reaches_a_master_in_a_nested_pid_namespace(tmp_path):
    """The master's pidfile says 1 (its pid in its container); `stop` from the parent
    namespace must signal the lock holder, which it sees under another pid — never
    its own namespace's PID 1. The parent namespace is itself a fresh one here, so
    that the old behaviour could only ever hit this test's own driver."""
    cfg = write_config(tmp_path, ECHO.format(workers=1))
    driver = tmp_path / "driver.py"
    driver.write_text(f"UNSHARE = {UNSHARE!r}\n" + textwrap.dedent(DRIVER))
    proc = subprocess.Popen(UNSHARE + [sys.executable, str(driver), str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()  # --kill-child: the whole namespace goes with it
            proc.wait()
    report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    assert report, err
    assert report["pidfile"] == "1"
    assert report["rc"] == 0, report
    assert report["stdout"].startswith("preforkd: stopped (pid ") and "(pid 1)" not in report["stdout"]
    assert report["master_exit"] == 0


# -- 7. every process a command connection starts ends with it ----------------------------

ESCAPE = '''#!/bin/sh
# A child that leaves our process group and session, holding the client's socket.
setsid sh -c 'echo $$ > {d}/escapee; echo ready > {d}/go; exec sleep 1001' &
read x < {d}/go
echo started
{tail}
'''


def _kill_if_alive(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    if not pid_gone(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("ending", ["program-exits", "supervisor-stops"])
def test_command_child_that_left_the_session_ends_with_the_connection(supervisor, tmp_path, ending):
    """``setsid sleep 1001 &`` in a command program escaped the process-group kill: the
    client never saw end of file and the sleep outlived `preforkd stop`."""
    os.mkfifo(tmp_path / "go")
    script = tmp_path / "escape.sh"
    script.write_text(ESCAPE.format(d=tmp_path, tail="exit 0" if ending == "program-exits" else "exec sleep 300"))
    script.chmod(0o755)
    sv = supervisor(f'''
        [supervisor]
        pidfile = "run/p.pid"
        control_socket = "run/p.sock"
        graceful_timeout = 1
        [[service]]
        name = "escape"
        listen = ["tcp://127.0.0.1:0"]
        command = ["{script}"]
        workers = 1
        idle_timeout = 120
    ''')
    try:
        with connect(sv.tcp("escape"), timeout=20) as s:
            assert recv_until(s, b"\n") == b"started\n"
            escapee = int((tmp_path / "escapee").read_text())
            assert os.getsid(escapee) == escapee  # it did leave the session
            if ending == "supervisor-stops":
                res = run_cli("stop", "-c", str(sv.config))
                assert res.returncode == 0, res.stderr
            assert recv_all(s) == b""  # end of file: nothing holds the socket any more
        wait_for(lambda: pid_gone(escapee), timeout=10, message="the escaped child to be gone")
    finally:
        _kill_if_alive(tmp_path / "escapee")


# -- 8. the control socket: many clients, and the descriptor limit ------------------------


def test_control_socket_answers_many_clients_at_once(supervisor, tmp_path):
    """More than 16 clients at once used to get EAGAIN from connect() (a backlog of
    16); `preforkd status` then said the master "does not answer"."""
    supervisor(ECHO.format(workers=1))
    path = str(tmp_path / "run" / "preforkd.sock")
    clients = 64
    barrier = threading.Barrier(clients)
    replies: List[str] = []
    lock = threading.Lock()

    def ping() -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)  # as the command line's client does: a non-blocking connect
            barrier.wait()
            try:
                s.connect(path)
                s.sendall(b"ping\n")
                reply = recv_all(s).decode().strip()
            except OSError as exc:
                reply = repr(exc)
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=ping) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert replies == ["pong"] * clients


def _free_below(pid: int, limit: int) -> int:
    """Descriptor numbers below *limit* not in use by *pid*."""
    return limit - sum(1 for fd in os.listdir(f"/proc/{pid}/fd") if int(fd) < limit)


def test_control_socket_at_the_descriptor_limit_does_not_spin(supervisor, tmp_path):
    """At the descriptor limit, accept() fails with EMFILE while the connection stays
    queued: the master used to wake up for it again at once, forever (99% CPU). It
    must rest until descriptors are free again, then answer."""
    sv = supervisor(ECHO.format(workers=1))
    path = str(tmp_path / "run" / "preforkd.sock")
    limit = max(int(fd) for fd in os.listdir(f"/proc/{sv.pid}/fd")) + 3
    _, hard = resource.prlimit(sv.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(sv.pid, resource.RLIMIT_NOFILE, (limit, hard))
    silent: List[socket.socket] = []  # clients that say nothing hold a descriptor each, for 5 s
    try:
        free = _free_below(sv.pid, limit)
        while free:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            silent.append(s)
            wait_for(lambda f=free: _free_below(sv.pid, limit) < f, timeout=10,
                     message="the master to accept a silent client")
            free = _free_below(sv.pid, limit)
        master = psutil.Process(sv.pid)
        cpu0, wall0 = sum(master.cpu_times()[:2]), time.monotonic()
        # Queued where the master cannot accept it; answered once the silent clients
        # time out (control.CLIENT_TIMEOUT) and their descriptors are free.
        from preforkd.control import query

        assert query(path, "ping", timeout=30) == "pong"
        cpu, wall = sum(master.cpu_times()[:2]) - cpu0, time.monotonic() - wall0
        assert wall > 1.0  # it did have to wait for descriptors
        assert cpu < 0.25 * wall, f"the master burnt {cpu:.2f} s of CPU in {wall:.2f} s at the fd limit"
        paused = sv.wait_event("control.accept_paused")
        assert paused["error"] == "Too many open files"
    finally:
        for s in silent:
            s.close()
