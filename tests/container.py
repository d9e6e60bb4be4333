"""A real systemd in a container, for test_systemd_real.py.

The root file system is made once by ``debootstrap`` (Debian's minimal variant plus
systemd, dbus and Python) and cached outside the repository, in
``$PREFORKD_TEST_CACHE`` (default ``/var/cache/preforkd-tests``), under a name derived
from its recipe: a changed recipe builds a new one, a missing one is built again. The
build holds a lock, so concurrent runs build it once. :func:`start_background_build`
lets the session begin it while other tests run (conftest.py).

Each test run boots it with ``systemd-nspawn --volatile=overlay`` (the cached tree is
read-only, changes go to a tmpfs and vanish), its own network namespace (its loopback
is its own: the shipped configuration's fixed ports collide with nothing), and the
checkout and a wheelhouse bind-mounted read-only. Commands run inside through
``nsenter`` into the container's PID 1.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Dict, List, Optional

CACHE = Path(os.environ.get("PREFORKD_TEST_CACHE", "/var/cache/preforkd-tests"))
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv"
RECIPE = ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm"]
#: The programs this needs on the host (Debian packages debootstrap, systemd-container,
#: util-linux), installed by tests/install-tools.sh.
TOOLS = ("debootstrap", "systemd-nspawn", "nsenter")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_build_lock = threading.Lock()
_build_error: Optional[str] = None


def unavailable() -> Optional[str]:
    """Why no container can be booted here (for a skip), or None."""
    if os.environ.get("PREFORKD_TEST_SYSTEMD", "").lower() in ("0", "no", "off"):
        return "PREFORKD_TEST_SYSTEMD is off"
    if os.geteuid() != 0:
        return "booting a systemd container (systemd-nspawn) needs root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return (f"{', '.join(missing)} not installed (Debian packages debootstrap, systemd-container; "
                "tests/install-tools.sh installs them as root)")
    return None


def rootfs_path() -> Path:
    key = hashlib.sha256(" ".join(RECIPE).encode()).hexdigest()[:12]
    return CACHE / f"bookworm-{key}"


def ensure_rootfs() -> Path:
    """The cached root file system, built first if missing (about 1-2 minutes).

    :raises RuntimeError: when debootstrap fails (its output's tail in the message).
    """
    global _build_error
    path = rootfs_path()
    with _build_lock:
        if _build_error:
            raise RuntimeError(_build_error)
        if (path / "usr/bin/python3").exists():
            return path
        CACHE.mkdir(parents=True, exist_ok=True)
        with open(CACHE / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it right now
            if (path / "usr/bin/python3").exists():
                return path
            tmp = CACHE / f".{path.name}.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            res = subprocess.run(RECIPE + [str(tmp)], capture_output=True, text=True, timeout=1200)
            if res.returncode != 0 or not (tmp / "usr/bin/python3").exists():
                shutil.rmtree(tmp, ignore_errors=True)
                _build_error = f"{' '.join(RECIPE)} failed ({res.returncode}): {(res.stdout + res.stderr)[-2000:]}"
                raise RuntimeError(_build_error)
            (tmp / "var/cache/apt/archives").mkdir(parents=True, exist_ok=True)
            for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()  # the packages are installed; keep the cache small
            tmp.rename(path)
    return path


def start_background_build() -> None:
    """Begin :func:`ensure_rootfs` in a thread when it can be used at all and the
    tree is missing (its errors surface in the test that waits for it)."""
    if unavailable() is None and not (rootfs_path() / "usr/bin/python3").exists():
        def build() -> None:
            try:
                ensure_rootfs()
            except (RuntimeError, OSError, subprocess.SubprocessError):
                pass
        threading.Thread(target=build, name="rootfs-build", daemon=True).start()


class Container:
    """One booted container. :meth:`stop` powers it off (and kills it, by PID, if it
    does not go)."""

    def __init__(self, rootfs: Path, binds: Dict[str, Path], log: Path) -> None:
        self.name = f"preforkd-test-{os.getpid()}"
        argv = ["systemd-nspawn", "-D", str(rootfs), "--volatile=overlay", "-b", "--console=pipe",
                "--register=no", "--keep-unit", "--private-network", "-M", self.name]
        argv += [f"--bind-ro={host}:{inside}" for inside, host in binds.items()]
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.leader: Optional[int] = None

    def find_leader(self) -> Optional[int]:
        """The container's PID 1 as the host sees it (systemd in another PID namespace)."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
        ours = os.readlink("/proc/self/ns/pid")
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
                if comm == "systemd" and os.readlink(f"/proc/{pid}/ns/pid") != ours:
                    self.leader = pid
                    return pid
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except OSError:
                continue
        return None

    def enter(self, *namespaces: str) -> List[str]:
        """``nsenter`` into the container: all namespaces, or only those named (``-n``)."""
        assert self.leader is not None
        return ["nsenter", "-t", str(self.leader), *(namespaces or ("-a",))]

    def sh(self, script: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run *script* with ``sh -c`` inside, with a plain environment."""
        argv = self.enter() + ["env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "sh", "-c", script]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"in the container: {script}\nexit {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    def stop(self) -> None:
        """Orderly power-off (SIGTERM to systemd-nspawn), then SIGKILL to the
        container's PID 1 and to systemd-nspawn, by PID, if they are still there."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                for pid in (self.leader, self.proc.pid):
                    if pid:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                self.proc.wait(30)
        self._log_file.close()
