"""The command line as a newcomer meets it (issue 12): --version, --help, the default
configuration from $PREFORKD_CONFIG, what `status` says it looked at and its LSB exit
codes, plurals, the human "serving" line on a terminal, sample-config, and what
`check` catches before anything starts."""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
from pathlib import Path
from typing import List

import pytest

from conftest import PREFORKD, ROOT, Supervisor, exchange, run_cli, wait_for, write_config

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

ECHO = '''
    [[service]]
    name = "echo"
    listen = ["tcp://127.0.0.1:0"]
    workers = 1
'''


@pytest.fixture
def started():
    """Supervisors a test starts itself (other arguments, a terminal); killed at teardown."""
    procs: List[Supervisor] = []
    yield procs
    for sv in procs:
        sv.kill_all()


def test_version_matches_the_package():
    res = run_cli("--version")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert res.returncode == 0 and res.stdout.strip() == f"preforkd {version}", res.stdout + res.stderr


def test_top_level_help_names_the_config_option_and_its_defaults():
    res = run_cli("--help")
    assert res.returncode == 0
    for word in ("-c FILE", "--config", "PREFORKD_CONFIG", "/etc/preforkd/preforkd.toml", "sample-config",
                 "--version"):
        assert word in res.stdout, word


def test_preforkd_config_is_the_default_configuration(started, tmp_path):
    cfg = write_config(tmp_path, ECHO)
    env = dict(os.environ, PREFORKD_CONFIG=cfg.name)  # relative: resolved against the cwd
    sv = Supervisor(cfg, extra_env={"PREFORKD_CONFIG": cfg.name}, argv=["run"])  # no -c
    started.append(sv)
    sv.wait_ready()
    st = json.loads(run_cli("status", "--json", cwd=tmp_path, env=env).stdout)
    assert st["running"] and st["pid"] == sv.pid and st["config"] == str(cfg)
    # The master goes on with the absolute path (a reload's check and new image get -c).
    assert run_cli("reload", cwd=tmp_path, env=env).returncode == 0
    assert run_cli("status", "--json", "-c", str(cfg)).returncode == 0
    # -c wins over the environment.
    (tmp_path / "other").mkdir()
    other = write_config(tmp_path / "other", ECHO)
    res = run_cli("status", "-c", str(other), env=env)
    assert res.returncode == 3 and f"config {other}" in res.stdout


def test_status_says_which_configuration_it_looked_at(supervisor, tmp_path):
    sv = supervisor(ECHO)
    # Without -c nor PREFORKD_CONFIG (and no /etc file here): the built-in default,
    # and a hint on how to name the file this supervisor was started from.
    res = run_cli("status", cwd=tmp_path)
    if not Path("/etc/preforkd/preforkd.toml").exists():
        if res.returncode == 3:  # nothing runs from the built-in default on this machine
            assert "built-in default configuration" in res.stdout and "PREFORKD_CONFIG" in res.stdout
            assert "-c FILE" in res.stdout
        else:  # someone's `make run` serves the built-in default right now
            assert res.returncode == 0 and "<built-in default>" in res.stdout
    running = run_cli("status", "-c", str(sv.config))
    assert running.returncode == 0 and f"config {sv.config}" in running.stdout
    line = "  service echo (preforkd.services:echo): 1 worker (0 busy, 1 idle), 0 connections open"
    assert line in running.stdout.splitlines()
    sv.signal(signal.SIGTERM)
    assert sv.wait_exit() == 0
    stopped = run_cli("status", "-c", str(sv.config))
    assert stopped.returncode == 3
    pidfile = sv.config.parent / "run" / "preforkd.pid"
    assert stopped.stdout.strip() == f"preforkd: not running (config {sv.config}, pidfile {pidfile})"


def test_status_of_a_missing_file_is_not_running_and_of_an_unreadable_one_unknown(tmp_path):
    missing = tmp_path / "nope.toml"
    res = run_cli("status", "-c", str(missing))
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.stdout.strip() == f"preforkd: not running (config {missing} does not exist)"
    res = run_cli("status", "--json", "-c", str(missing))
    assert res.returncode == 3 and json.loads(res.stdout)["running"] is False
    # A file that cannot be parsed at all names neither pidfile nor control socket: LSB 4.
    broken = tmp_path / "broken.toml"
    broken.write_text("x = \n")
    res = run_cli("status", "-c", str(broken))
    assert res.returncode == 4 and "status unknown" in res.stderr and "broken.toml" in res.stderr


def test_plurals(tmp_path):
    one = write_config(tmp_path, ECHO)
    res = run_cli("check", "-c", str(one))
    assert res.returncode == 0 and res.stdout.strip() == f"{one}: OK (1 service, 1 listener, 1 worker)"
    two = write_config(tmp_path, ECHO.replace('workers = 1', 'workers = 2') + ECHO.replace('"echo"', '"e2"'),
                       name="two.toml")
    assert run_cli("check", "-c", str(two)).stdout.strip() == f"{two}: OK (2 services, 2 listeners, 3 workers)"


def test_a_terminal_is_told_in_one_line_when_it_serves(started, tmp_path):
    """On a TTY (make run), one human line once every worker accepts; not otherwise."""
    cfg = write_config(tmp_path, '''
        [[service]]
        name = "echo"
        listen = ["tcp://127.0.0.1:0", "unix:run/echo.sock"]
        workers = 2

        [[service]]
        name = "daytime"
        listen = ["tcp://127.0.0.1:0"]
        handler = "preforkd.services:daytime"
        workers = 1
    ''')
    primary, secondary = pty.openpty()
    try:
        sv = Supervisor(cfg, stdout=secondary)
        started.append(sv)
        os.close(secondary)
        seen: List[bytes] = []

        def line() -> bool:
            seen.append(os.read(primary, 4096))
            return b"Ctrl-C stops" in b"".join(seen)
        wait_for(line, message="the serving line on the terminal")
        sv.wait_event("supervisor.ready")
        echo, daytime = sv.addresses("echo"), sv.addresses("daytime")
        assert b"".join(seen).decode().strip() == (f"preforkd: serving echo on {', '.join(echo)} (2 workers); "
                                                   f"daytime on {daytime[0]} (1 worker); Ctrl-C stops")
        assert exchange(sv.tcp("echo"), b"hi\r\n") == b"hi\r\n"
        sv.signal(signal.SIGTERM)
        assert sv.wait_exit() == 0
    finally:
        os.close(primary)


def test_a_started_daemon_reloads(tmp_path):
    """`start` then `reload`: the re-executed image of a daemon has no standard streams
    (found by the README walk: the terminal check must not trip over that)."""
    cfg = write_config(tmp_path, ECHO)
    res = run_cli("start", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    pid = int(res.stdout.split()[-1])
    try:
        res = run_cli("reload", "-c", str(cfg))
        assert res.returncode == 0 and f"generation 2 serving (pid {pid})" in res.stdout, res.stdout + res.stderr
        assert run_cli("stop", "-c", str(cfg)).returncode == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_no_serving_line_without_a_terminal(supervisor):
    sv = supervisor(ECHO)
    sv.signal(signal.SIGTERM)
    assert sv.wait_exit() == 0
    assert "Ctrl-C" not in sv._out.text()


@pytest.mark.parametrize("name,source", [("preforkd.toml", "etc/preforkd.toml"),
                                         ("preforkd.service", "systemd/preforkd.service"),
                                         ("preforkd.socket", "systemd/preforkd.socket")])
def test_sample_config_prints_the_shipped_files(name, source, tmp_path):
    res = run_cli("sample-config", name) if name != "preforkd.toml" else run_cli("sample-config")
    assert res.returncode == 0 and res.stdout == (ROOT / source).read_text()


def test_sample_config_refuses_other_names():
    res = run_cli("sample-config", "passwd")
    assert res.returncode == 2 and "invalid choice" in res.stderr


# -- check: can it start for this user? ------------------------------------------


def unwritable(directory: Path) -> List[str]:
    """A command prefix under which *directory* is not writable for the user running
    it: a read-only bind mount in a private mount namespace as root (who may write
    anywhere else), ``chmod 0555`` otherwise."""
    if os.geteuid() == 0:
        unshare = shutil.which("unshare")
        if unshare is None:
            pytest.skip("unshare (util-linux) is not installed")
        return [unshare, "-m", "sh", "-c", f'mount --bind -o ro "{directory}" "{directory}" && exec "$0" "$@"']
    directory.chmod(0o555)
    return []


def check_as(prefix: List[str], cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run(prefix + PREFORKD + ["check", "-c", str(cfg)], capture_output=True, text=True,
                          timeout=60)


def test_check_refuses_runtime_directories_this_user_cannot_write(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    cfg = write_config(tmp_path, '''
        [supervisor]
        pidfile = "ro/preforkd.pid"
        control_socket = "ro/sub/preforkd.sock"
        working_directory = "missing"

        [log]
        file = "ro/preforkd.log"

        [[service]]
        name = "echo"
        listen = ["tcp://127.0.0.1:0", "unix:ro/echo.sock"]
    ''')
    try:
        res = check_as(unwritable(ro), cfg)
    finally:
        ro.chmod(0o755)
    assert res.returncode == 1 and res.stdout == "", res.stdout + res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 5, res.stderr
    who = "uid" if os.geteuid() else "uid 0"
    assert lines[0].startswith(f"preforkd: {cfg}: supervisor.pidfile: directory {ro} is not writable by {who}")
    assert lines[1].startswith(f"preforkd: {cfg}: supervisor.control_socket: cannot create {ro}/sub: {ro} is not "
                               "writable")
    assert lines[2].startswith(f"preforkd: {cfg}: log.file: directory {ro} is not writable")
    assert lines[3].startswith(f"preforkd: {cfg}: service[0].listen[1]: directory {ro} is not writable")
    assert lines[4] == f"preforkd: {cfg}: supervisor.working_directory: {tmp_path}/missing is not a directory"
    if os.geteuid() == 0:
        assert all("(read-only file system)" in ln for ln in lines[:4])
    # The same configuration with writable places passes, and start-up agrees.
    (tmp_path / "missing").mkdir()
    assert run_cli("check", "-c", str(cfg)).returncode == 0


def test_check_leaves_existing_socket_files_alone(supervisor, tmp_path):
    """A running supervisor (or systemd, for an activated socket) holds its Unix
    socket files: a reload's check passes even where no new file could be made."""
    sv = supervisor('''
        [supervisor]
        pidfile = "run/preforkd.pid"
        control_socket = "sock/preforkd.sock"

        [[service]]
        name = "echo"
        listen = ["unix:sock/echo.sock"]
        workers = 1
    ''')
    sock = tmp_path / "sock"
    try:
        res = check_as(unwritable(sock), sv.config)
    finally:
        sock.chmod(0o755)
    assert res.returncode == 0, res.stderr


def test_check_warns_about_what_only_root_can_do(tmp_path):
    cfg = write_config(tmp_path, '''
        [supervisor]
        pidfile = "run/preforkd.pid"
        control_socket = "run/preforkd.sock"
        user = "nobody"

        [[service]]
        name = "echo"
        listen = ["tcp://127.0.0.1:0"]
    ''')
    if os.geteuid() == 0:
        res = run_cli("check", "-c", str(cfg))
        assert res.returncode == 0 and res.stderr == ""
    else:
        res = run_cli("check", "-c", str(cfg))
        assert res.returncode == 0
        assert "warning" in res.stderr and "supervisor.user: ignored" in res.stderr
    bad = write_config(tmp_path, '[supervisor]\ngroup = "no-such-group-here"\n' + ECHO, name="bad.toml")
    res = run_cli("check", "-c", str(bad))
    assert res.returncode == 1 and res.stderr.strip() == (
        f'preforkd: {bad}: supervisor.group: no such group "no-such-group-here"')
