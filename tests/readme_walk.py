"""Walk README.md top to bottom as a newcomer does, in a fresh copy of the checkout
(run by test_readme.py, inside a private network and mount namespace: the README's own
ports are free there, /run is a private tmpfs, and pip works from a local wheelhouse
through PIP_NO_INDEX and PIP_FIND_LINKS, since the namespace reaches no index).

    python readme_walk.py COPY DESTDIR

Every command of every ```sh block is run in order by the step that the table STEPS
names for it; a command with no step fails the walk, so a README that gains a command
gains a step. Then the "Without installing anything" commands of docs/systemd.md.
Prints one line per step; exits 1 with the reason at the first one that fails.
Every process it starts is stopped by its PID (or process group) before it exits.
"""

from __future__ import annotations

import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from docwalk import Command, commands

COPY, DESTDIR = Path(sys.argv[1]), Path(sys.argv[2])
BIN = COPY / ".venv/bin"
started: List[subprocess.Popen] = []
terminal: Dict[str, object] = {}


def wait_for(predicate: Callable[[], object], timeout: float = 60, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def sh(text: str, env: Optional[dict] = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", text], cwd=COPY, capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def expect(cmd: Command, res: subprocess.CompletedProcess, code: int = 0) -> None:
    assert res.returncode == code, f"{cmd.text}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    shown = [ln.strip() for ln in cmd.output]
    if shown:
        assert [ln.strip() for ln in res.stdout.splitlines()] == shown, f"{cmd.text}: printed\n{res.stdout}"


def background(argv: List[str], env: Optional[dict] = None) -> subprocess.Popen:
    proc = subprocess.Popen(argv, cwd=COPY, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    started.append(proc)
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    return proc.wait(60)


def talk(port: int, typed: List[str], read_until: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        data = b""
        for line in typed:
            s.sendall(line.encode() + b"\n")
        while read_until not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.decode()


# -- the steps ----------------------------------------------------------------------


def make_run(cmd: Command) -> None:
    """On a terminal, as a person runs it: the build's steps show, then one line."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(["make", "run"], cwd=COPY, stdin=secondary, stdout=secondary, stderr=secondary,
                            start_new_session=True)
    os.close(secondary)
    started.append(proc)
    seen = bytearray()

    def serving() -> bool:
        try:
            seen.extend(os.read(primary, 65536))
        except OSError:
            raise AssertionError(f"make run ended:\n{seen.decode(errors='replace')}") from None
        return b"; Ctrl-C stops" in seen
    wait_for(serving, timeout=600, what="make run to serve")
    text = seen.decode(errors="replace")
    steps = [ln for ln in text.splitlines() if ln.startswith("make: [")]
    assert [s[:11] for s in steps] == ["make: [1/3]", "make: [2/3]", "make: [3/3]"], text
    assert "preforkd: serving echo on tcp://127.0.0.1:7000 (4 workers); Ctrl-C stops" in text, text
    terminal.update(proc=proc, fd=primary, text=text)


def ctrl_c_make_run() -> None:
    proc = terminal.pop("proc", None)
    if isinstance(proc, subprocess.Popen):
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C on its terminal sends
        assert proc.wait(60) in (0, 2, 130, -signal.SIGINT), proc.returncode
        os.close(int(terminal.pop("fd")))  # type: ignore[call-overload]


def nc_echo(cmd: Command) -> None:
    typed = cmd.output[0]
    assert talk(7000, [typed], b"\r\n") == typed + "\r\n"


def literal(cmd: Command) -> None:
    expect(cmd, sh(cmd.text))


def status_running(cmd: Command) -> None:
    res = sh(cmd.text)
    assert res.returncode == 0 and "preforkd master pid" in res.stdout, res.stdout + res.stderr


def run_config(cmd: Command) -> None:
    """``preforkd run -c FILE`` in its own terminal: until the status answers."""
    config = cmd.text.split("-c ", 1)[1]
    proc = background(cmd.text.split())
    terminal.setdefault("runs", []).append(proc)  # type: ignore[union-attr]
    wait_for(lambda: proc.poll() is not None or sh(f"{BIN}/preforkd status -c {config}").returncode == 0,
             what=cmd.text)
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""


def nc_daytime(cmd: Command) -> None:
    res = sh(cmd.text, timeout=30)
    assert res.returncode == 0 and re.fullmatch(r"\w+, \w+ \d+, \d{4} \d\d:\d\d:\d\d-UTC", res.stdout.strip()), (
        res.stdout)


def nc_interactive(cmd: Command) -> None:
    typed = [ln.split("Command? ", 1)[1] for ln in cmd.output if ln.startswith("Command? ") and
             ln != "Command? "]
    out = talk(7001, typed, b"Bye.")
    assert out.startswith("Welcome, 127.0.0.1;") and "Bye." in out, out


def ctrl_c_runs() -> None:
    for proc in terminal.pop("runs", []):  # type: ignore[union-attr]
        assert stop(proc, signal.SIGINT) == 0


def make_install(cmd: Command) -> None:
    ctrl_c_make_run()  # the README says: stop make run first
    res = sh(f"make install DESTDIR={DESTDIR}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (DESTDIR / "etc/preforkd/preforkd.toml").exists() and (DESTDIR / "usr/local/bin/preforkd").is_symlink()


def under_systemd(cmd: Command) -> None:
    """test_systemd_real.py runs these in a booted systemd, from docs/systemd.md."""
    assert cmd.text in {c.text for c in commands(COPY / "docs/systemd.md") if c.section == "Install"}, cmd.text


def preforkd_self(cmd: Command) -> None:
    """``sudo preforkd X`` on the installed configuration (under DESTDIR here)."""
    env = dict(os.environ, PREFORKD_CONFIG=str(DESTDIR / "etc/preforkd/preforkd.toml"))
    res = sh(cmd.text.replace("sudo preforkd", f"{BIN}/preforkd"), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    if cmd.text.endswith("start"):
        assert res.stdout.startswith("preforkd: started, master pid")
        terminal["daemon"] = int(res.stdout.split()[-1])


def skip_make_test(cmd: Command) -> None:
    """This walk is part of `make test`."""


def socket_activate(cmd: Command) -> None:
    terminal["activate"] = background(cmd.text.split())
    wait_for(lambda: _listening(7000), what="systemd-socket-activate to listen")


def _listening(port: int) -> bool:
    with open("/proc/net/tcp") as f:
        return any(f":{port:04X} 00000000:0000 0A" in line for line in f)


STEPS: Dict[str, Callable[[Command], None]] = {
    "make run": make_run,
    "make test": skip_make_test,
    "nc 127.0.0.1 7000": nc_echo,
    "printf 'one\\r\\ntwo\\n' | nc -q1 127.0.0.1 7000": literal,
    ".venv/bin/preforkd status": status_running,
    ".venv/bin/preforkd run -c examples/interactive.toml": run_config,
    "printf 'hi over unix\\n' | socat - UNIX-CONNECT:examples/run/echo.sock": literal,
    "nc 127.0.0.1 7013": nc_daytime,
    "nc 127.0.0.1 7001": nc_interactive,
    ".venv/bin/preforkd status -c examples/interactive.toml": status_running,
    ".venv/bin/preforkd run -c pingpong.toml": run_config,
    "printf 'PING\\nhello\\n' | nc -q1 127.0.0.1 7100": literal,
    "sudo make install": make_install,
    "sudo systemctl daemon-reload": under_systemd,
    "sudo systemctl enable --now preforkd": under_systemd,
    "sudo preforkd check": preforkd_self,
    "sudo preforkd start": preforkd_self,
    "sudo preforkd status": preforkd_self,
    "sudo preforkd reload": preforkd_self,
    "sudo preforkd stop": preforkd_self,
    # docs/systemd.md, "Without installing anything"
    "systemd-socket-activate -l 127.0.0.1:7000 --fdname=echo .venv/bin/preforkd run": socket_activate,
    "printf 'activated\\n' | nc -q1 127.0.0.1 7000": literal,
}


def write_files(page: Path) -> None:
    """The README's files (a code block whose first line is ``# NAME``), as a reader
    saves them into the checkout."""
    text = page.read_text()
    for _lang, body in re.findall(r"```(python|toml)\n(.*?)```", text, re.S):
        first = body.splitlines()[0]
        name = re.match(r"# ([\w.]+)", first)
        if name:
            (COPY / name.group(1)).write_text(body)


def main() -> int:
    section = None
    try:
        write_files(COPY / "README.md")
        walk = commands(COPY / "README.md")
        walk += [c for c in commands(COPY / "docs/systemd.md") if c.section == "Without installing anything"]
        unknown = [c.text for c in walk if c.text not in STEPS]
        assert not unknown, f"commands the walk does not know (add a step in tests/readme_walk.py): {unknown}"
        for cmd in walk:
            if cmd.section != section:
                ctrl_c_runs()  # "Ctrl-C stops it": a section's own supervisors end with it
                section = cmd.section
            t0 = time.monotonic()
            STEPS[cmd.text](cmd)
            print(f"ok {time.monotonic() - t0:6.1f} s  [{cmd.section}] {cmd.text}", flush=True)
        ctrl_c_runs()
        return 0
    except AssertionError as exc:
        print(f"FAILED [{section}]: {exc}", flush=True)
        return 1
    finally:
        ctrl_c_make_run_quietly()
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        daemon = terminal.get("daemon")
        if isinstance(daemon, int):
            try:
                os.kill(daemon, signal.SIGKILL)
            except ProcessLookupError:
                pass


def ctrl_c_make_run_quietly() -> None:
    try:
        ctrl_c_make_run()
    except (AssertionError, OSError, subprocess.TimeoutExpired):
        pass


if __name__ == "__main__":
    sys.exit(main())
