"""Under a real systemd (issue 12, item 8): the shipped units, installed the way
docs/systemd.md says, in a booted container (tests/container.py).

One container for the module; the steps build on each other in order, as an operator's
day would: install and start, reload (good and bad), stop, socket activation with a
crash of the master under load, the watchdog. Skipped with the reason where no
container can be booted (not root, tools missing); with CI set, a container that does
not boot is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator

import pytest

import container
from conftest import ROOT, wait_for
from docwalk import commands

REASON = container.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no systemd container: {REASON}")
CONFIG = "/etc/preforkd/preforkd.toml"
BOOT_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Iterator[container.Container]:
    rootfs = container.ensure_rootfs()
    logs = tmp_path_factory.mktemp("container")
    c = container.Container(rootfs, {"/mnt/src": ROOT, "/mnt/wheels": wheelhouse}, logs / "console.log")
    try:
        try:
            wait_for(c.find_leader, timeout=BOOT_TIMEOUT, message="the container's systemd")
        except (AssertionError, RuntimeError) as exc:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"this machine cannot boot a systemd container: {exc}")
        # "offline" until the manager listens; --wait then waits for the boot to finish.
        wait_for(lambda: c.sh("systemctl is-system-running --wait", timeout=BOOT_TIMEOUT,
                              check=False).stdout.strip() in ("running", "degraded"),
                 timeout=BOOT_TIMEOUT, interval=0.2, message="the container's boot")
        yield c
    finally:
        c.stop()


def show(box: container.Container, unit: str = "preforkd.service") -> Dict[str, str]:
    props = "ActiveState,SubState,Result,MainPID,StatusText,NRestarts,ExecMainStatus"
    out = box.sh(f"systemctl show -p {props} {unit}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def status(box: container.Container) -> Dict:
    return json.loads(box.sh(f"preforkd status --json -c {CONFIG}").stdout)


def echo(box: container.Container, line: str) -> str:
    """One echo exchange with 127.0.0.1:7000 in the container's network namespace."""
    client = ("import socket,sys; s=socket.create_connection(('127.0.0.1',7000),timeout=10); "
              "s.sendall(sys.argv[1].encode()+b'\\r\\n'); print(s.recv(100).decode().strip())")
    res = subprocess.run(box.enter("-n") + [sys.executable, "-c", client, line], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def paste(box: container.Container, section: str) -> None:
    """Run docs/systemd.md's commands under *section*, in order, as root inside; what a
    comment quotes must be in the output. ``make install`` gets the wheels built
    outside (the container has no certificates for a package index)."""
    cmds = [c for c in commands(ROOT / "docs/systemd.md") if c.section == section]
    assert cmds, section
    for cmd in cmds:
        text = cmd.text.removeprefix("sudo ")
        if text == "make install":
            text = "sh /mnt/src/scripts/install.sh --wheels /mnt/wheels"
        res = box.sh(text, timeout=300)
        for quoted in cmd.quoted():
            assert quoted in res.stdout, f"{cmd.text}: {quoted!r} not in\n{res.stdout}"


def test_install_and_start_waits_for_ready(box):
    paste(box, "Install")
    # `enable --now` returned: READY=1 had been sent, so everything serves at once.
    st = show(box)
    assert st["ActiveState"] == "active" and st["SubState"] == "running"
    assert st["StatusText"] == "serving 2 services with 5 workers"
    assert echo(box, "first") == "first"
    doc = status(box)
    assert doc["pid"] == int(st["MainPID"]) and doc["generation"] == 1
    assert all(w["state"] == "idle" for s in doc["services"] for w in s["workers"])
    assert [lst["origin"] for s in doc["services"] for lst in s["listeners"]] == ["bound"] * 4


def test_reload_ok_and_refused(box):
    pid = show(box)["MainPID"]
    assert box.sh("systemctl reload preforkd").returncode == 0
    assert status(box)["generation"] == 2 and show(box)["MainPID"] == pid
    # A bad configuration: `systemctl reload` fails, the old generation serves on.
    box.sh(f"cp {CONFIG} /root/good.toml && sed -i 's/^workers = 4/workers = 0/' {CONFIG}")
    res = box.sh("systemctl reload preforkd", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    st, doc = show(box), status(box)
    assert st["ActiveState"] == "active" and st["MainPID"] == pid
    assert doc["generation"] == 2  # `preforkd reload` refused the file before any SIGHUP
    journal = box.sh("journalctl -u preforkd -o cat --no-pager").stdout
    assert "service[0].workers: must be an integer >= 1" in journal
    assert echo(box, "still") == "still"
    box.sh(f"cp /root/good.toml {CONFIG}")
    assert box.sh("systemctl reload preforkd").returncode == 0
    assert status(box)["generation"] == 3 and show(box)["MainPID"] == pid


def test_stop_is_graceful_and_in_time(box):
    box.sh("systemctl stop preforkd")
    st = show(box)
    # Result would be "timeout" had it outlived TimeoutStopSec and needed SIGKILL.
    assert (st["ActiveState"], st["Result"], st["ExecMainStatus"]) == ("inactive", "success", "0")
    journal = box.sh("journalctl -u preforkd -o cat --no-pager").stdout
    assert '"supervisor.stopped"' in journal


def test_socket_holds_the_sockets_across_a_crash(box):
    paste(box, "Socket activation")
    st = show(box)
    assert st["ActiveState"] == "active" and show(box, "preforkd.socket")["ActiveState"] == "active"
    origins = {lst["address"]: lst["origin"] for s in status(box)["services"] for lst in s["listeners"]}
    assert origins["tcp://127.0.0.1:7000"] == origins["tcp://[::1]:7000"] == "activated"
    restarts = int(st["NRestarts"])

    load = subprocess.Popen(box.enter("-n") + [sys.executable, str(ROOT / "tests/load_client.py"), "127.0.0.1",
                                               "7000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert load.stdout is not None and load.stdin is not None
        assert load.stdout.readline().strip() == "started"
        wait_for(lambda: echo(box, "warm") == "warm")
        box.sh(f"kill -9 {st['MainPID']}")
        wait_for(lambda: show(box)["MainPID"] not in ("0", st["MainPID"]) and show(box)["SubState"] == "running",
                 timeout=60, message="preforkd restarted")
        load.stdin.write("mark\n")
        load.stdin.flush()
        assert load.stdout.readline().strip() == "marked"
        assert echo(box, "after") == "after"
        load.stdin.close()
        counts = json.loads(load.stdout.readline())
    finally:
        if load.poll() is None:
            load.kill()
        load.wait(30)
    assert int(show(box)["NRestarts"]) == restarts + 1
    # Clients that connected while no preforkd ran waited in the kernel's queue: none
    # was refused. (A connection a worker held when the master died may be reset.)
    assert counts.get("refused", 0) == 0, counts
    assert counts["short_ok"] > 0 and set(counts) <= {"short_ok", "ok_after_mark", "failures", "reset",
                                                       "truncated"}, counts
    doc = status(box)
    assert {lst["origin"] for s in doc["services"] for lst in s["listeners"]
            if lst["address"].startswith("tcp://")} >= {"activated"}


def test_watchdog_kills_a_stopped_master_and_it_is_restarted(box):
    box.sh("mkdir -p /etc/systemd/system/preforkd.service.d && "
           "printf '[Service]\\nWatchdogSec=3\\n' > /etc/systemd/system/preforkd.service.d/watchdog.conf && "
           "systemctl daemon-reload && systemctl restart preforkd")
    st = show(box)
    assert st["ActiveState"] == "active"
    restarts = int(st["NRestarts"])
    box.sh(f"kill -STOP {st['MainPID']}")
    wait_for(lambda: show(box)["MainPID"] not in ("0", st["MainPID"]) and show(box)["SubState"] == "running",
             timeout=60, message="the watchdog's restart")
    assert int(show(box)["NRestarts"]) == restarts + 1
    journal = box.sh("journalctl -u preforkd --no-pager").stdout
    assert "Watchdog timeout" in journal, journal[-3000:]
    assert echo(box, "watched") == "watched"
