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
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from conftest import connect, recv_until, run_cli, wait_for

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
