"""``preforkd status`` per-service totals and ``preforkd top`` (issue 11): the text and
``--json`` views, a bounded top for scripts, and top in a real terminal (a pty) until
Ctrl-C."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time

from conftest import PREFORKD, exchange, run_cli, wait_for

CONFIG = '''
[[service]]
name = "echo"
listen = ["tcp://127.0.0.1:0"]
workers = 2
max_workers = 5
'''


def test_status_shows_per_service_totals(supervisor):
    sv = supervisor(CONFIG)
    for i in range(4):
        assert exchange(sv.tcp("echo"), b"x%d\n" % i) == b"x%d\r\n" % i
    svc = wait_for(lambda: (lambda s: s if s["connections_total"] == 4 else None)(sv.status()["services"][0]))
    assert svc["listen_queue"] == 0 and svc["pool"]["max"] == 5 and svc["listeners"][0]["queue"] == 0
    assert svc["listeners"][0]["queue_limit"] > 0
    text = run_cli("status", "-c", str(sv.config)).stdout
    assert re.search(r"totals: 4 connections served, \d+ busy / \d+ idle / 5 max workers, listen queue 0", text), text
    assert "(queue 0 of " in text


def test_top_with_a_bounded_number_of_refreshes(supervisor):
    sv = supervisor(CONFIG)
    for i in range(3):
        assert exchange(sv.tcp("echo"), b"y%d\n" % i) == b"y%d\r\n" % i
    wait_for(lambda: sv.status()["services"][0]["connections_total"] == 3)
    res = run_cli("top", "-c", str(sv.config), "--iterations", "2", "--interval", "0.2")
    assert res.returncode == 0, res.stderr
    frames = ["preforkd top:" + f for f in res.stdout.split("preforkd top:")[1:]]
    assert len(frames) == 2 and "\x1b[" not in res.stdout, res.stdout  # no escapes off a terminal
    for n, frame in enumerate(frames):
        assert frame.startswith(f"preforkd top: master pid {sv.pid}, running, generation 1"), frame
        header = next(line for line in frame.splitlines() if line.startswith("SERVICE"))
        row = next(line for line in frame.splitlines() if line.startswith("echo"))
        assert header.split() == ["SERVICE", "CONN/S", "SERVED", "OPEN", "BUSY", "IDLE", "START", "MAX", "QUEUE"]
        cells = row.split()
        assert cells[2] == "3" and cells[7] == "5" and cells[8] == "0", row
        assert (cells[1] == "-") if n == 0 else re.fullmatch(r"\d+\.\d", cells[1]), row


def test_top_not_running_exits_3(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('[supervisor]\ncontrol_socket = "run/none.sock"\npidfile = "run/p.pid"\n' + CONFIG)
    res = run_cli("top", "-c", str(cfg), "--iterations", "1")
    assert res.returncode == 3 and "not running" in res.stderr


def test_top_in_a_terminal_refreshes_until_ctrl_c(supervisor):
    sv = supervisor(CONFIG)
    pid, fd = pty.fork()
    if pid == 0:  # the child: top on the pty, its controlling terminal
        try:
            os.execv(sys.executable, PREFORKD + ["top", "-c", str(sv.config), "--interval", "0.2"])
        finally:
            os._exit(127)
    screen = b""
    reaped: list = []
    try:
        deadline = time.monotonic() + 30
        while screen.count(b"SERVICE") < 3 and time.monotonic() < deadline:  # three refreshes
            if select.select([fd], [], [], 1)[0]:
                try:
                    screen += os.read(fd, 65536)
                except OSError:
                    break
        assert screen.count(b"SERVICE") >= 3, screen[-2000:]
        assert b"\x1b[H\x1b[2J" in screen and b"\x1b[?25l" in screen  # redrawn in place, cursor hidden
        os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to top
        wait_for(lambda: reaped.append(os.waitpid(pid, os.WNOHANG)) or reaped[-1][0] == pid,
                 message="top to exit on Ctrl-C")
        assert os.waitstatus_to_exitcode(reaped[-1][1]) == 0
        try:
            while select.select([fd], [], [], 0.5)[0]:
                screen += os.read(fd, 65536)
        except OSError:
            pass
        assert screen.rstrip(b"\r\n").endswith(b"\x1b[?25h")  # the cursor is given back
    finally:
        if not reaped or reaped[-1][0] != pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
