"""The README walked top to bottom as a newcomer does it (tests/readme_walk.py), in a
fresh copy of this checkout, so that a README that lies fails CI; with it the commands
of docs/systemd.md that run without systemd. (docs/systemd.md's install and socket
activation commands run under a real systemd in test_systemd_real.py.)

The walk runs in its own network namespace (``unshare -n``, loopback up) and mount
namespace (a private /run): the README's fixed ports and the built-in default's
/run/preforkd collide with nothing on this machine. That namespace reaches no package
index, so pip takes the wheelhouse (preforkd's dependencies and setuptools, fetched
beforehand) through PIP_NO_INDEX and PIP_FIND_LINKS; everything else is the README's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

TOOLS = ("unshare", "ip", "nc", "socat", "systemd-socket-activate", "make")
missing = [t for t in TOOLS if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or bool(missing),
    reason=("the walk needs root for its network namespace" if os.geteuid() != 0 else
            f"{', '.join(missing)} not installed (tests/install-tools.sh installs them as root)"))


def fresh_copy(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked and new, not ignored), without
    .venv or any build output: what a fresh clone holds, plus uncommitted edits."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file() or src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)
    return dest


def in_namespace(pid: int, netns: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") == netns
    except OSError:
        return False


def test_readme_top_to_bottom(tmp_path, wheelhouse):
    copy = fresh_copy(tmp_path / "preforkd")
    destdir = tmp_path / "root"
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse), PIP_CONFIG_FILE="/dev/null",
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("MAKEFLAGS", None)
    env.pop("MAKELEVEL", None)
    script = 'mount -t tmpfs tmpfs /run && ip link set lo up && exec "$@"'
    walk = subprocess.Popen(["unshare", "-n", "-m", "sh", "-c", script, "walk", sys.executable,
                             str(ROOT / "tests/readme_walk.py"), str(copy), str(destdir)],
                            cwd=ROOT / "tests", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    netns = ""
    try:
        def learn_netns() -> str:
            return os.readlink(f"/proc/{walk.pid}/ns/net")
        netns = learn_netns()
        out, _ = walk.communicate(timeout=900)
        print(out)
        assert walk.returncode == 0, out
        assert "FAILED" not in out and out.count("\nok ") + out.startswith("ok ") >= 20, out
    finally:
        # Whatever the walk left (it stops its own; a daemon it started escapes its
        # process group): every process in its network namespace, by PID.
        if walk.poll() is None:
            os.killpg(walk.pid, signal.SIGKILL)
            walk.wait(30)
        if netns and netns != os.readlink("/proc/self/ns/net"):
            for entry in os.listdir("/proc"):
                if entry.isdigit() and in_namespace(int(entry), netns):
                    try:
                        os.kill(int(entry), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
