"""The command line: ``preforkd [-c FILE] {run,start,stop,reload,status,top,check,drain,undrain,sample-config}``.

The configuration file is ``-c FILE``, else ``$PREFORKD_CONFIG``, else
``/etc/preforkd/preforkd.toml`` if it exists, else the built-in default.

Exit statuses: 0 success; 1 failure (one line on stderr says why); ``status``
returns 3 when the supervisor is not running and 4 when it cannot tell (the
configuration cannot be read, or the runtime directory is not to be trusted; LSB
init-script convention, "status" action).
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

from . import __version__
from .config import Config, ConfigError, load_config, resolve_config_path, runtime_only_config
from .handler import Handler, load_handlers
from .shipped import SAMPLE_FILES, read_shipped

EXIT_OK, EXIT_FAIL, EXIT_NOT_RUNNING = 0, 1, 3
#: LSB "program or service status is unknown": the configuration that names the
#: pidfile and control socket cannot be read, or their directory is not to be trusted.
EXIT_UNKNOWN = 4
#: The default configuration file when ``-c`` is not given (before the system default).
CONFIG_PATH_ENV = "PREFORKD_CONFIG"

_DESCRIPTION = """A pre-fork daemon supervisor for Unix.

The configuration file is -c FILE (before or after the command), else
$PREFORKD_CONFIG, else /etc/preforkd/preforkd.toml if it exists, else the
built-in default (one echo service on tcp://127.0.0.1:7000)."""

_EPILOG = """examples:
  preforkd run                          serve the built-in default in the foreground
  preforkd check -c preforkd.toml       validate a configuration, start nothing
  preforkd sample-config > preforkd.toml   the commented example configuration
  preforkd status -c preforkd.toml      what runs (exit 3 when not running)

docs: docs/ in the source tree; `preforkd COMMAND --help` for a command's options."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", dest="sub_config", metavar="FILE", default=None,
                        help=f"configuration file (default: ${CONFIG_PATH_ENV}, else /etc/preforkd/preforkd.toml "
                             "if it exists, else the built-in default: echo on tcp://127.0.0.1:7000)")
    p = argparse.ArgumentParser(prog="preforkd", description=_DESCRIPTION, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", dest="config", metavar="FILE", default=None,
                   help=f"configuration file, also accepted after the command (default: ${CONFIG_PATH_ENV}, "
                        "else /etc/preforkd/preforkd.toml if it exists, else the built-in default)")
    p.add_argument("-V", "--version", action="version", version=f"preforkd {__version__}")
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
    sp = sub.add_parser("top", parents=[common], help="per-service totals, refreshed every second until Ctrl-C")
    sp.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (default 1)")
    sp.add_argument("--iterations", type=int, default=0, metavar="N",
                    help="stop after N refreshes (default: until Ctrl-C)")
    sub.add_parser("check", parents=[common],
                   help="validate the configuration (and that it can start as this user) and exit")
    sp = sub.add_parser("sample-config", help="print the commented example configuration or a systemd unit",
                        description="Print a file shipped with preforkd: the commented example "
                                    "configuration (etc/preforkd.toml in the source tree) or a systemd unit.")
    sp.add_argument("name", nargs="?", default=SAMPLE_FILES[0], choices=SAMPLE_FILES,
                    help=f"which file (default {SAMPLE_FILES[0]})")
    sub.add_parser("drain", parents=[common], help="take this host out of the load balancer's rotation "
                                                  "(the agent-check says drain); keep serving")
    sub.add_parser("undrain", parents=[common], help="put this host back into rotation")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """The ``preforkd`` console script (also ``python -m preforkd``).

    :param argv: the arguments after the program name; ``None`` reads ``sys.argv``.
    :returns: the exit status (see the module docstring); usage errors exit 2
        through argparse.
    """
    args = _parser().parse_args(argv)
    command = args.command
    if command == "sample-config":
        sys.stdout.write(read_shipped(args.name))
        return EXIT_OK
    # An absolute path from here on: a daemon chdirs, and a re-exec'd master and the
    # reload check get it as -c, whatever the environment then says.
    config_arg = args.sub_config or args.config or os.environ.get(CONFIG_PATH_ENV) or None
    if config_arg:
        config_arg = os.path.abspath(config_arg)
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
        fallback = runtime_only_config(path) if command in ("status", "stop", "top") else None
        if fallback is None and command == "status":
            return _status_unreadable(path, exc, as_json=args.json)
        if fallback is None:
            print(f"preforkd: {exc}", file=sys.stderr)
            return EXIT_FAIL
        # A running supervisor keeps its last good configuration when an edit breaks the
        # file (the reload is refused): it must still be possible to see and stop it.
        print(f"preforkd: warning: {exc}", file=sys.stderr)
        config = fallback
    action = {"run": _run, "start": _start, "stop": _stop, "reload": _reload, "status": _status,
              "check": _check, "top": _top, "drain": _drain, "undrain": _drain}[command]
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
    from .preflight import preflight
    from .reexec import VERSION_PROBE_ENV, Handover
    from .status import plural

    config = inv.config
    listeners = sum(len(s.listen) for s in config.services)
    workers = sum(s.workers for s in config.services)
    if os.environ.pop(VERSION_PROBE_ENV, None):  # a reloading master's check of the new code
        print(f"handover-version {Handover.VERSION}")
        failure = _try_worker_init(inv)
        if failure:
            print(f"preforkd: {failure}", file=sys.stderr)
            return EXIT_FAIL
    errors, warnings = preflight(config)  # can it start for this user?
    for line in warnings:
        print(f"preforkd: warning: {line}", file=sys.stderr)
    for line in errors:
        print(f"preforkd: {line}", file=sys.stderr)
    if errors:
        return EXIT_FAIL
    print(f"{config.source}: OK ({plural(len(config.services), 'service')}, {plural(listeners, 'listener')}, "
          f"{plural(workers, 'worker')})")
    return EXIT_OK


def _try_worker_init(inv: Invocation) -> Optional[str]:
    """Run every service's ``worker_init`` as a worker would (privileges dropped first),
    so that a reload into code whose workers cannot start is refused before the master
    commits to ``execve``. Returns the first failure as one line, or ``None``."""
    from .config import credentials

    try:
        credentials(inv.config).assume()
    except (OSError, KeyError) as exc:
        return f"{inv.config.source}: supervisor.user: cannot become the workers' user: {exc}"
    for index, svc in enumerate(inv.config.services):
        handler = inv.handlers.get(svc.name)
        if handler is None:
            continue
        try:
            handler.worker_init()
        except Exception as exc:  # noqa: BLE001 - any failure is the reason the reload fails
            first = " ".join(str(exc).split())
            return f"{inv.config.source}: service[{index}].handler: worker_init failed: {type(exc).__name__}: {first}"
    return None


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
    master = Master(config, inv.handlers, log, inv.config_arg, handover=handover)
    # Someone watches (make run): one human line when it serves. A daemon's re-executed
    # image has no standard streams at all (sys.stdout is None).
    if sys.stdout is not None and sys.stdout.isatty():
        master.announce = _announce
    return master.run()


def _announce(line: str) -> None:
    """Print the master's "serving ..." line for a person at a terminal."""
    try:
        print(f"preforkd: {line}; Ctrl-C stops", flush=True)
    except OSError:
        pass  # the terminal went away; the log says it all


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


#: Master states in which a HUP starts no reload: a TERM's ``drain_delay``, the stop.
_NO_RELOAD = ("draining", "stopping")


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
    if before["state"] in _NO_RELOAD:  # the master would keep the HUP until it exits
        print(f"preforkd: the supervisor is stopping ({before['state']}); not reloading", file=sys.stderr)
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
            try:
                _master_pid(config)  # the pidfile's lock is held across the re-exec
            except NotFound:
                print("preforkd: the supervisor exited before the reload finished", file=sys.stderr)
                return EXIT_FAIL
            continue  # between images, or busy
        if st["state"] in _NO_RELOAD:
            print(f"preforkd: the supervisor began stopping ({st['state']}); not reloaded", file=sys.stderr)
            return EXIT_FAIL
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


def _drain(inv: Invocation) -> int:
    """``drain`` / ``undrain``: the command of that name on the control socket."""
    from .control import query

    command, sock = inv.args.command, inv.config.supervisor.control_socket
    try:
        reply = json.loads(query(sock, command))
    except (OSError, ValueError) as exc:
        print(f"preforkd: {command}: cannot reach the control socket {sock}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if not isinstance(reply, dict) or "draining" not in reply:
        print(f"preforkd: {command}: unexpected reply {reply!r}", file=sys.stderr)
        return EXIT_FAIL
    if reply["draining"]:
        print("preforkd: draining (the agent-check says drain; connections are still served)")
    else:
        print("preforkd: in rotation (the agent-check says up)")
    return EXIT_OK


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
    except (OSError, ValueError) as why:
        try:
            pid = _master_pid(config)
        except NotFound as exc:
            if str(exc):
                print(f"preforkd: {exc}", file=sys.stderr)
                return EXIT_UNKNOWN
            if args.json:
                print(json.dumps({"running": False, "config": config.source,
                                  "pidfile": config.supervisor.pidfile or None}))
            else:
                print(f"preforkd: not running ({_looked_at(config)})")
            return EXIT_NOT_RUNNING
        reason = str(why) if isinstance(why, ValueError) else (why.strerror or str(why))
        if args.json:
            print(json.dumps({"running": True, "pid": pid, "error": f"control socket not answering: {reason}"}))
        else:
            print(f"preforkd: running as pid {pid}, but the control socket "
                  f"{config.supervisor.control_socket} does not answer ({reason})")
        return EXIT_OK
    if args.json:
        print(json.dumps(dict(st, running=True), indent=2))
    else:
        print(render(st))
    return EXIT_OK


def _top(inv: Invocation) -> int:
    from .top import run

    return run(inv.config.supervisor.control_socket, max(0.1, inv.args.interval), max(0, inv.args.iterations))


def _looked_at(config: Config) -> str:
    """Which configuration and pidfile ``status`` looked at, and how to name another."""
    where = f"pidfile {config.supervisor.pidfile}" if config.supervisor.pidfile else "no pidfile"
    if config.path:
        return f"config {config.path}, {where}"
    return (f"built-in default configuration, {where}; for a supervisor started from a file "
            f"give -c FILE or set {CONFIG_PATH_ENV}")


def _status_unreadable(path: Optional[str], exc: ConfigError, as_json: bool) -> int:
    """``status`` when the configuration cannot be read, so neither the pidfile nor
    the control socket is known: a missing file is "not running" (3), anything else
    "unknown" (4), as the LSB init-script "status" action defines them."""
    missing = bool(path) and not os.path.lexists(str(path))
    code = EXIT_NOT_RUNNING if missing else EXIT_UNKNOWN
    if as_json:
        print(json.dumps({"running": False if missing else None, "config": path, "error": str(exc)}))
    elif missing:
        print(f"preforkd: not running (config {path} does not exist)")
    else:
        print(f"preforkd: status unknown: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
