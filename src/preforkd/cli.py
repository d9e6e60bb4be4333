"""The command line: ``preforkd [-c FILE] {run,start,stop,reload,status,check}``.

Exit statuses: 0 success; 1 failure (one line on stderr says why); ``status``
returns 3 when the supervisor is not running and 4 when it cannot tell (the runtime
directory is not to be trusted; LSB init-script convention).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time
from typing import Dict, List, Optional, Tuple

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


class NotFound(Exception):
    """No master to talk to; ``str()`` is the one line to print (exit 1), or ""
    when there simply is none running (a missing or stale pidfile)."""


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


def _master_pid(config: Config) -> int:
    """The pid of the process that holds the pidfile's lock, as this process sees it:
    the running master. The pid written in the file is not trusted (a stale file may
    name anybody; a master in a container writes the pid it has in there).

    :raises NotFound: ``str()`` empty when nothing is running (no pidfile, or nobody
        holds its lock); else one line saying why the master cannot be reached from here.
    """
    from .pidfile import OUTSIDE_NAMESPACE, lock_holder

    path = config.supervisor.pidfile
    if not path:
        raise NotFound("")
    problem = _runtime_problem(config)
    if problem:
        raise NotFound(problem)
    try:
        holder = lock_holder(path)
    except OSError as exc:
        raise NotFound(f"cannot read pidfile {path}: {exc.strerror}") from None
    if holder is None:
        raise NotFound("")
    if holder == OUTSIDE_NAMESPACE:
        raise NotFound(f"pidfile {path} is held by a process outside this PID namespace "
                       "(a supervisor in another container?); it cannot be signalled from here")
    return holder


def _signal_master(config: Config, sig: int) -> Tuple[int, Optional[int]]:
    """Send *sig* to the process holding the pidfile's lock (:func:`_master_pid`).

    Through a pidfd (pidfd_open(2), Linux 5.3) taken *before* the lock is looked up
    once more, so that the signal reaches the process that held the lock even if it
    exited and its pid was reused in between.

    :returns: ``(pid, pidfd)``; the pidfd (or ``None`` where there are none) tells
        when that process has exited: the caller closes it.
    :raises NotFound: as :func:`_master_pid` does; when the master is gone by the time
        it would be signalled (with an empty message); or when this user may not
        signal it.
    """
    pid = _master_pid(config)
    try:
        pidfd: Optional[int] = os.pidfd_open(pid)
    except (AttributeError, OSError) as exc:
        if isinstance(exc, ProcessLookupError):
            raise NotFound("") from None
        pidfd = None  # no pidfds here: plain kill(2)
    try:
        if pidfd is not None and _master_pid(config) != pid:
            raise NotFound("")  # exited meanwhile; the pid may be somebody else's now
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError) as exc:
        if pidfd is not None:
            os.close(pidfd)
        raise NotFound("" if isinstance(exc, ProcessLookupError) else f"not allowed to signal pid {pid}") from None
    except BaseException:
        if pidfd is not None:
            os.close(pidfd)
        raise
    return pid, pidfd


def _stop(inv: Invocation) -> int:
    config, args = inv.config, inv.args
    try:
        pid, pidfd = _signal_master(config, signal.SIGTERM)
    except NotFound as exc:
        if str(exc):
            print(f"preforkd: {exc}", file=sys.stderr)
            return EXIT_FAIL
        print("preforkd: not running")
        return EXIT_OK
    timeout = args.timeout if args.timeout is not None else config.supervisor.graceful_timeout + 10
    try:
        if _wait_exit(pid, pidfd, timeout):
            print(f"preforkd: stopped (pid {pid})")
            return EXIT_OK
    finally:
        if pidfd is not None:
            os.close(pidfd)
    print(f"preforkd: pid {pid} still running after {timeout:g} s", file=sys.stderr)
    return EXIT_FAIL


def _wait_exit(pid: int, pidfd: Optional[int], timeout: float) -> bool:
    """Wait up to *timeout* seconds for the process to exit: *pidfd* turns readable
    then (pidfd_open(2)); without one, poll its state."""
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reload(inv: Invocation) -> int:
    from .control import query_status

    config, args = inv.config, inv.args
    try:
        _master_pid(config)
    except NotFound as exc:
        print(f"preforkd: {str(exc) or 'not running; nothing to reload'}", file=sys.stderr)
        return EXIT_FAIL
    sock = config.supervisor.control_socket
    try:
        before = query_status(sock)
    except (OSError, ValueError) as exc:
        print(f"preforkd: cannot read status from {sock}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    seq0 = int(before["reload"]["seq"])
    try:
        _, pidfd = _signal_master(config, signal.SIGHUP)
    except NotFound as exc:
        print(f"preforkd: {str(exc) or 'not running; nothing to reload'}", file=sys.stderr)
        return EXIT_FAIL
    if pidfd is not None:
        os.close(pidfd)
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
        try:
            pid = _master_pid(config)
        except NotFound as exc:
            if str(exc):
                print(f"preforkd: {exc}", file=sys.stderr)
                return EXIT_UNKNOWN
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
