"""preforkd as a container's PID 1: ``preforkd run`` as the first process of its own PID
namespace (``unshare --pid --fork --mount-proc``, util-linux), as a container runtime
starts an entry point.

PID 1 has two duties an ordinary process has not: every orphan in the namespace is
reparented to it, so it must reap them (or they stay zombies for ever), and the kernel
delivers it only the signals it has a handler for (a TERM it did not handle would be
ignored, and ``docker stop`` would end in a KILL). The test shows preforkd serving
there, reaping an orphan that is not one of its workers, and stopping cleanly on TERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap

import psutil
import pytest

from conftest import PREFORKD, LogReader, exchange, wait_for, write_config

UNSHARE = shutil.which("unshare")
pytestmark = [
    pytest.mark.skipif(UNSHARE is None, reason="unshare (util-linux) not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a new PID namespace needs root (CAP_SYS_ADMIN)"),
]

ORPHANS = '''
import os
import time


def handle(line):
    """"orphan": leave a grandchild behind, reparented to PID 1, that exits with 7."""
    if line != "orphan":
        return line
    child = os.fork()
    if child == 0:
        if os.fork() == 0:
            time.sleep(0.3)
            os._exit(7)
        os._exit(0)
    os.waitpid(child, 0)
    return "orphaned"
'''


def test_preforkd_as_pid_1_serves_reaps_orphans_and_stops_on_term(tmp_path):
    (tmp_path / "orphans.py").write_text(ORPHANS)
    cfg = write_config(tmp_path, textwrap.dedent('''
        [supervisor]
        pidfile = "run/preforkd.pid"
        control_socket = "run/preforkd.sock"
        graceful_timeout = 10
        python_path = ["."]

        [[service]]
        name = "app"
        listen = ["tcp://127.0.0.1:0"]
        handler = "orphans:handle"
        workers = 2
    '''))
    assert UNSHARE is not None
    proc = subprocess.Popen([UNSHARE, "--pid", "--fork", "--mount-proc", *PREFORKD, "run", "-c", str(cfg)],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    log = LogReader(proc.stderr)
    seen = {proc.pid}
    try:
        def event(name, **fields):
            def found():
                assert proc.poll() is None or log.find(name, **fields), log.text()[-3000:]
                return log.find(name, **fields)
            return wait_for(found, message=name)[0]

        ready = event("supervisor.ready")
        assert ready["pid"] == 1  # the master is PID 1 of its namespace
        master = psutil.Process(proc.pid).children()[0]  # its PID as this test sees it
        seen.add(master.pid)
        seen.update(p.pid for p in master.children(recursive=True))
        addr = event("listener.bound", service="app")["address"][len("tcp://"):].rpartition(":")
        host_port = (addr[0], int(addr[2]))
        assert exchange(host_port, b"hello\r\n") == b"hello\r\n"
        # an orphan that is not a worker: reparented to PID 1, which reaps it
        assert exchange(host_port, b"orphan\r\n") == b"orphaned\r\n"
        reaped = event("child.reaped", exit_code=7)
        assert reaped["pid"] == 1
        assert not [p for p in master.children() if p.status() == psutil.STATUS_ZOMBIE]
        # TERM to PID 1 (from outside its namespace, as a runtime's stop does): a clean stop
        seen.update(p.pid for p in master.children(recursive=True))
        master.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # unshare exits with its child's status
        event("supervisor.stopped")
        assert not (tmp_path / "run" / "preforkd.pid").exists()
        assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
                   for p in seen - {proc.pid})
    finally:
        if proc.poll() is None:  # failed midway: KILL to the namespace's PID 1 ends all of it
            for pid in sorted(seen - {proc.pid}) + [proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            proc.wait(10)
