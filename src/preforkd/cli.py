"""The command line: ``preforkd [-c FILE] {run,start,stop,reload,status,check}``.

Exit statuses: 0 success; 1 failure (one line on stderr says why); ``status``
returns 3 when the supervisor is not running (LSB init-script convention).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional

from .config import Config, ConfigError, load_config, resolve_config_path

EXIT_OK, EXIT_FAIL, EXIT_NOT_RUNNING = 0, 1, 3


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
    try:
        config = load_config(path, import_handlers=command in ("run", "start", "check", "reload"), text=text)
    except ConfigError as exc:
        fallback = _runtime_only_config(path) if command in ("status", "stop") else None
        if fallback is None:
            print(f"preforkd: {exc}", file=sys.stderr)
            return EXIT_FAIL
        # A running supervisor keeps its last good configuration when an edit breaks the
        # file (the reload is refused): it must still be possible to see and stop it.
        print(f"preforkd: warning: {exc}", file=sys.stderr)
        config = fallback
    handler = {"run": _run, "start": _start, "stop": _stop, "reload": _reload, "status": _status,
               "check": _check}[command]
    try:
        return handler(config, config_arg, args)
    except KeyboardInterrupt:
        return 130


def _runtime_only_config(path: Optional[str]) -> Optional[Config]:
    """The file's ``[supervisor]`` table (pidfile, control socket) with the rest left
    at the built-in default, for ``status`` and ``stop`` when the file as a whole is
    invalid; ``None`` when even that table cannot be read."""
    from .config import BUILTIN_DEFAULT, build_config, tomllib

    if not path:
        return None
    try:
        with open(path, "rb") as f:
            data = tomllib.loads(f.read().decode("utf-8"))
        sup = data.get("supervisor", {})
        abspath = os.path.abspath(path)
        return build_config({"supervisor": sup, **BUILTIN_DEFAULT}, path, os.path.dirname(abspath), abspath,
                            import_handlers=False)
    except (OSError, ValueError, ConfigError):
        return None


def _check(config: Config, config_arg: Optional[str], args: Any) -> int:
    listeners = sum(len(s.listen) for s in config.services)
    workers = sum(s.workers for s in config.services)
    print(f"{config.source}: OK ({len(config.services)} services, {listeners} listeners, {workers} workers)")
    return EXIT_OK


def _run(config: Config, config_arg: Optional[str], args: Any) -> int:
    from . import log, reexec
    from .master import Master

    try:
        inherited = reexec.take_inherited_state()
    except ValueError as exc:
        print(f"preforkd: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        # A re-exec'd master writes its first events after its new workers accept.
        log.configure(config.log.level, config.log.format, config.log.file, defer=inherited is not None)
    except OSError as exc:
        print(f"preforkd: {config.source}: log.file: cannot open {config.log.file}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_FAIL
    return Master(config, config_arg, inherited=inherited).run()


def _start(config: Config, config_arg: Optional[str], args: Any) -> int:
    from .daemon import start

    return start(config, config_arg, args.timeout)


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


def _stop(config: Config, config_arg: Optional[str], args: Any) -> int:
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


def _reload(config: Config, config_arg: Optional[str], args: Any) -> int:
    from .control import query_status

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


def _status(config: Config, config_arg: Optional[str], args: Any) -> int:
    from .control import query_status

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
        print(_format_status(st))
    return EXIT_OK


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [f"{d}d"] if d else []
    if d or h:
        parts.append(f"{h}h")
    if d or h or m:
        parts.append(f"{m}m")
    parts.append(f"{s}s")
    return " ".join(parts)


def _format_status(st: Dict[str, Any]) -> str:
    lines = [f"preforkd master pid {st['pid']}, {st['state']}, generation {st['generation']}, "
             f"up {_duration(st['uptime'])}", f"  config {st['config']}"]
    rel = st.get("reload") or {}
    if rel.get("state") == "failed":
        lines.append(f"  last reload failed: {rel.get('error')}")
    for svc in st["services"]:
        what = svc["handler"] or " ".join(svc["command"] or [])
        lines.append(f"  service {svc['name']} ({what}), {svc['workers_target']} workers")
        for lst in svc["listeners"]:
            lines.append(f"    listen {lst['address']}")
        if svc.get("backoff"):
            lines.append(f"    back-off after {svc['backoff']['failures']} quick failures: "
                         f"{svc['backoff']['last_failure']}")
        for w in svc["workers"]:
            rss = f"{w['rss'] / 1048576:.1f} MiB" if w.get("rss") else "?"
            cpu = f"{w['cpu']:.2f} s" if w.get("cpu") is not None else "?"
            lines.append(f"    worker #{w['number']:<3} pid {w['pid']:<7} gen {w['generation']:<3} "
                         f"{w['state']:<9} served {w['connections']:<7} rss {rss:<10} cpu {cpu}")
    for w in st.get("retiring_workers", []):
        lines.append(f"  retiring worker pid {w['pid']} gen {w['generation']} {w['state']}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
