"""The command line: ``preforkd [-c FILE] {run,start,stop,reload,status,check}``.

Exit statuses: 0 success; 1 failure (one line on stderr says why); ``status``
returns 3 when the supervisor is not running and 4 when it cannot tell (the runtime
directory is not to be trusted; LSB init-script convention).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Dict, List, Optional

from .config import Config, ConfigError, load_config, resolve_config_path, runtime_only_config
from .handler import Handler, load_handlers

EXIT_OK, EXIT_FAIL, EXIT_NOT_RUNNING, EXIT_UNKNOWN = 0, 1, 3, 4


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", dest="sub_config", metavar="FILE", default=None,
                        help="configuration file (default: /etc/preforkd/preforkd.toml if it exists, "
                             "else the built-in default: echo on tcp://127.0.0.1:7000)")
    p = argparse.ArgumentParser(prog="preforkd", description="A pre-fork daemon supervisor for Unix.")
    p.add_argument("-c", "--config", dest="config", metavar="FILE", default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("run", parents=[common], help="run the supervisor in the foreground")
    sp = sub.add_parser("start", parents=[common], help="daemonize; return once it serves")
    sp.add_argument("--timeout", type=float, default=60.0, metavar="S",
                    help="seconds to wait for the daemon to be ready (default 60)")
    sp = sub.add_parser("stop", parents=[common], help="graceful stop (SIGTERM) and wait")
    sp.add_argument("--timeout", type=float, default=None, metavar="S",
                    help="seconds to wait (default: graceful_timeout + 10)")
    sp = sub.add_parser("reload", parents=[common], help="check the config, SIGHUP, wait for the new generation")
    sp.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds to wait (default 60)")
    sp = sub.add_parser("status", parents=[common], help="show the master, services and workers")
    sp.add_argument("--json", action="store_true", help="print the status document as JSON")
    sub.add_parser("check", parents=[common], help="validate the configuration and exit")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    config_arg = args.sub_config or args.config
    if config_arg:
        config_arg = os.path.abspath(config_arg)
    command = args.command
    if command in ("run", "start"):
        # A HUP must never kill the supervisor, even one that arrives while it is still
        # starting (importing, reading its configuration): it stays pending until the
        # master has installed its handlers and unblocks it (reexec.unblock_signals).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    path = resolve_config_path(config_arg)
    from .reexec import CONFIG_ENV

    # Set only by a reloading master, for its check and its new image (see reexec.py).
    validated = os.environ.pop(CONFIG_ENV, None)
    text = validated.encode("utf-8") if validated is not None and path and command in ("run", "check") else None
    handlers: Dict[str, Handler] = {}
    try:
        config = load_config(path, text=text)
        if command in ("run", "start", "check", "reload"):
            handlers = load_handlers(config)
    except ConfigError as exc:
        fallback = runtime_only_config(path) if command in ("status", "stop") else None
        if fallback is None:
            print(f"preforkd: {exc}", file=sys.stderr)
            return EXIT_FAIL
        # A running supervisor keeps its last good configuration when an edit breaks the
        # file (the reload is refused): it must still be possible to see and stop it.
        print(f"preforkd: warning: {exc}", file=sys.stderr)
        config = fallback
    action = {"run": _run, "start": _start, "stop": _stop, "reload": _reload, "status": _status,
              "check": _check}[command]
    try:
        return action(Invocation(config, handlers, config_arg, args))
    except KeyboardInterrupt:
        return 130


class Invocation:
    """What every command gets: the configuration, its resolved handlers (``run``,
    ``start``, ``check``, ``reload``), the ``-c`` argument (absolute) and the options."""

    def __init__(self, config: Config, handlers: Dict[str, Handler], config_arg: Optional[str],
                 args: argparse.Namespace) -> None:
        self.config, self.handlers, self.config_arg, self.args = config, handlers, config_arg, args


def _check(inv: Invocation) -> int:
    from .reexec import VERSION_PROBE_ENV, Handover

    config = inv.config
    listeners = sum(len(s.listen) for s in config.services)
    workers = sum(s.workers for s in config.services)
    if os.environ.pop(VERSION_PROBE_ENV, None):  # a reloading master asks what this code reads
        print(f"handover-version {Handover.VERSION}")
    print(f"{config.source}: OK ({len(config.services)} services, {listeners} listeners, {workers} workers)")
    return EXIT_OK


def _run(inv: Invocation) -> int:
    from .log import EventLog
    from .master import Master
    from .reexec import HandoverError, take_handover

    config = inv.config
    try:
        handover = take_handover()
    except HandoverError as exc:
        print(f"preforkd: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        # A re-exec'd master writes its first events after its new workers accept.
        log = EventLog(config.log.level, config.log.format, config.log.file, defer=handover is not None)
    except OSError as exc:
        print(f"preforkd: {config.source}: log.file: cannot open {config.log.file}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_FAIL
    return Master(config, inv.handlers, log, inv.config_arg, handover=handover).run()


def _start(inv: Invocation) -> int:
    from .daemon import start

    return start(inv.config, inv.handlers, inv.config_arg, inv.args.timeout)


def _runtime_problem(config: Config) -> Optional[str]:
    """Why the directories of the pidfile and the control socket must not be trusted
    (another user owns one, or can write to it), or ``None``."""
    from .files import runtime_dir_problem

    for what, path in (("pidfile", config.supervisor.pidfile), ("control socket", config.supervisor.control_socket)):
        if path:
            problem = runtime_dir_problem(os.path.dirname(path), daemon=False)
            if problem:
                return f"{what} {path}: {problem}; not trusting it"
    return None


def _live_pid(config: Config) -> Optional[int]:
    """The running master's pid from the pidfile, or None (no file, stale file)."""
    from .pidfile import is_locked, looks_like_preforkd, read_pid

    path = config.supervisor.pidfile
    if not path:
        return None
    pid = read_pid(path)
    if pid is None:
        return None
    if is_locked(path) or looks_like_preforkd(pid):
        try:
            os.kill(pid, 0)
            return pid
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
    return None


def _stop(inv: Invocation) -> int:
    config, args = inv.config, inv.args
    problem = _runtime_problem(config)
    if problem:
        print(f"preforkd: {problem}", file=sys.stderr)
        return EXIT_FAIL
    pid = _live_pid(config)
    if pid is None:
        print("preforkd: not running")
        return EXIT_OK
    timeout = args.timeout if args.timeout is not None else config.supervisor.graceful_timeout + 10
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print("preforkd: not running")
        return EXIT_OK
    except PermissionError:
        print(f"preforkd: not allowed to signal pid {pid}", file=sys.stderr)
        return EXIT_FAIL
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            print(f"preforkd: stopped (pid {pid})")
            return EXIT_OK
        time.sleep(0.05)
    print(f"preforkd: pid {pid} still running after {timeout:g} s", file=sys.stderr)
    return EXIT_FAIL


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reload(inv: Invocation) -> int:
    from .control import query_status

    config, args = inv.config, inv.args
    problem = _runtime_problem(config)
    if problem:
        print(f"preforkd: {problem}", file=sys.stderr)
        return EXIT_FAIL
    pid = _live_pid(config)
    if pid is None:
        print("preforkd: not running; nothing to reload", file=sys.stderr)
        return EXIT_FAIL
    sock = config.supervisor.control_socket
    try:
        before = query_status(sock)
    except (OSError, ValueError) as exc:
        print(f"preforkd: cannot read status from {sock}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    seq0 = int(before["reload"]["seq"])
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            st = query_status(sock, timeout=2.0)
        except (OSError, ValueError):
            continue  # between images, or busy
        rel = st["reload"]
        if int(rel["seq"]) > seq0 and rel["state"] in ("ok", "failed"):
            if rel["state"] == "ok" and st["state"] == "running":
                print(f"preforkd: reloaded, generation {st['generation']} serving (pid {st['pid']})")
                return EXIT_OK
            if rel["state"] == "failed":
                print(f"preforkd: reload failed, still serving generation {st['generation']}: {rel['error']}",
                      file=sys.stderr)
                return EXIT_FAIL
    print(f"preforkd: reload not finished after {args.timeout:g} s", file=sys.stderr)
    return EXIT_FAIL


def _status(inv: Invocation) -> int:
    from .control import query_status
    from .status import render

    config, args = inv.config, inv.args
    problem = _runtime_problem(config)
    if problem:
        print(f"preforkd: {problem}", file=sys.stderr)
        return EXIT_UNKNOWN
    try:
        st = query_status(config.supervisor.control_socket)
    except (OSError, ValueError):
        pid = _live_pid(config)
        if pid is None:
            if args.json:
                print(json.dumps({"running": False}))
            else:
                print("preforkd: not running")
            return EXIT_NOT_RUNNING
        if args.json:
            print(json.dumps({"running": True, "pid": pid, "error": "control socket not answering"}))
        else:
            print(f"preforkd: running as pid {pid}, but the control socket "
                  f"{config.supervisor.control_socket} does not answer")
        return EXIT_OK
    if args.json:
        print(json.dumps(dict(st, running=True), indent=2))
    else:
        print(render(st))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
