"""Configuration: TOML file -> validated, frozen dataclasses.

Every mistake raises :class:`ConfigError`, whose ``str()`` is one line naming the
file, the key path and what is wrong, e.g.::

    preforkd.toml: service[1].workers: must be an integer >= 1, got "four"

Service indexes in key paths count from 0, in file order. Relative paths are
resolved against the configuration file's directory. Unknown keys are errors.
The keys are documented in ``docs/configuration.md`` and ``etc/preforkd.toml``.
"""

from __future__ import annotations

import errno
import grp
import importlib.util
import ipaddress
import os
import pwd
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

from .addresses import Address, AddressError, parse_address
from .files import read_regular_file

DEFAULT_CONFIG_PATH = "/etc/preforkd/preforkd.toml"
DEFAULT_HANDLER = "preforkd.services:echo"
#: What a command service's program gets as PATH (no inherited PATH).
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOG_LEVELS = ("debug", "info", "warning", "error")
LEVELS_ORDER = LOG_LEVELS  # from the most to the least verbose
LOG_FORMATS = ("auto", "json", "console")
#: Largest number of seconds a timeout may be (the kernel's timers take whole seconds
#: as a C int or unsigned; about 31 years).
MAX_SECONDS = 1_000_000_000
#: Shortest timeout that means something: the kernel's socket timers tick in jiffies
#: (1-10 ms), and a smaller SO_RCVTIMEO rounds to zero, which means "no timeout".
MIN_SECONDS = 0.01
#: Connections one event-driven worker may serve at once (each costs a descriptor).
MAX_WORKER_CONNECTIONS = 1_000_000
EVENT_LOOPS = ("auto", "asyncio", "uvloop")
#: listen(2) takes an int; the kernel caps it at net.core.somaxconn anyway.
MAX_BACKLOG = 2 ** 31 - 1
#: Who may send a PROXY protocol header by default: this host only.
DEFAULT_PROXY_TRUSTED = ("127.0.0.0/8", "::1/128")
#: Workers per pool (TTIN stops there too); the scoreboard has room for four times
#: that in all, old generations included.
MAX_WORKERS = 1024
#: Largest configuration file read, in bytes (1 MiB): it is read by the master on
#: every HUP, and a file that is not a regular file or is larger is a failed reload.
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(Exception):
    """A configuration mistake, rendered as one line: ``FILE: KEY.PATH: what is wrong``."""

    def __init__(self, source: str, keypath: str, message: str) -> None:
        self.source = source
        self.keypath = keypath
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.keypath:
            return f"{self.source}: {self.keypath}: {self.message}"
        return f"{self.source}: {self.message}"


@dataclass(frozen=True)
class SupervisorConfig:
    """``[supervisor]``: paths absolute ("" = none); ``graceful_timeout`` in seconds;
    ``umask`` as an int."""

    pidfile: str
    control_socket: str
    graceful_timeout: float
    working_directory: str
    umask: int
    user: str
    group: str
    python_path: Tuple[str, ...]
    event_loop: str  # auto | asyncio | uvloop: the event-driven workers' loop
    agent_check: Optional[Address]  # HAProxy agent-check listener (tcp:// only), or None
    drain_delay: float  # seconds of "drain" on TERM before the listeners close; 0 = none


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: ``file`` absolute, "" for stderr; ``access``: one ``connection.closed``
    event per connection."""

    level: str
    format: str
    file: str
    access: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: ``listen`` is the Prometheus endpoint's address, ``None`` when off."""

    listen: Optional[Address] = None


@dataclass(frozen=True)
class ServiceConfig:
    """One ``[[service]]``: ``handler`` ("module:attribute") or ``command`` (argv, the
    program's path resolved); ``idle_timeout`` in seconds; ``max_line_length`` in bytes
    (terminator excluded); ``socket_mode`` as an int."""

    name: str
    listen: Tuple[Address, ...]
    handler: str
    command: Tuple[str, ...]
    workers: int
    max_requests: int
    idle_timeout: float
    max_line_length: int
    backlog: int
    socket_mode: int
    reuse_port: bool
    max_workers: int  # == workers: a fixed pool
    min_spare_workers: int
    max_spare_workers: int
    worker_connections: int  # > 1: event-driven workers
    line_timeout: float  # seconds from a line's first byte to its end
    timeout: float  # seconds a worker may spend in handler code (or its loop may stall); 0 = never
    max_rss: int  # MiB; a worker above it is replaced after the connection in hand; 0 = never
    proxy_protocol: bool = False  # every connection starts with a PROXY v1 or v2 header
    proxy_trusted: Tuple[str, ...] = DEFAULT_PROXY_TRUSTED  # CIDR networks allowed to send one

    @property
    def dynamic(self) -> bool:
        """The pool grows and shrinks between ``workers`` and ``max_workers``."""
        return self.max_workers > self.workers

    @property
    def event_driven(self) -> bool:
        """Each worker serves up to ``worker_connections`` connections on an event loop."""
        return self.worker_connections > 1

    @property
    def is_command(self) -> bool:
        return bool(self.command)


@dataclass(frozen=True)
class Config:
    """The whole validated configuration. ``path`` is absolute, or "" for the built-in default."""

    path: str
    supervisor: SupervisorConfig
    log: LogConfig
    services: Tuple[ServiceConfig, ...]
    metrics: MetricsConfig = MetricsConfig()

    @property
    def source(self) -> str:
        return self.path or "<built-in default>"


def default_runtime_dir() -> str:
    """Where the built-in default keeps its pidfile and control socket.

    ``/run/preforkd`` for root, else ``$XDG_RUNTIME_DIR/preforkd``, else
    ``/tmp/preforkd-UID``.
    """
    if os.geteuid() == 0:
        return "/run/preforkd"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "preforkd")
    return f"/tmp/preforkd-{os.geteuid()}"


# -- validation helpers -------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return str(value)


class _Validator:
    def __init__(self, source: str, base_dir: str) -> None:
        self.source = source
        self.base_dir = base_dir

    def fail(self, keypath: str, message: str) -> ConfigError:
        return ConfigError(self.source, keypath, message)

    def table(self, data: Any, keypath: str, allowed: Tuple[str, ...]) -> Dict[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(keypath, f"must be a table, got {_show(data)}")
        for key in data:
            if key not in allowed:
                where = f"{keypath}.{key}" if keypath else key
                raise self.fail(where, "unknown key (allowed: " + ", ".join(allowed) + ")")
        return data

    def string(self, data: Dict[str, Any], key: str, keypath: str, default: str, allow_empty: bool = True) -> str:
        value = data.get(key, default)
        if not isinstance(value, str):
            raise self.fail(f"{keypath}.{key}", f"must be a string, got {_show(value)}")
        if not allow_empty and not value:
            raise self.fail(f"{keypath}.{key}", "must not be empty")
        return value

    def integer(self, data: Dict[str, Any], key: str, keypath: str, default: int, minimum: int,
                maximum: Optional[int] = None) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(f"{keypath}.{key}", f"must be an integer >= {minimum}, got {_show(value)}")
        if maximum is not None and value > maximum:
            raise self.fail(f"{keypath}.{key}", f"must be at most {maximum}, got {value}")
        return value

    def number(self, data: Dict[str, Any], key: str, keypath: str, default: float, allow_zero: bool = False) -> float:
        value = data.get(key, default)
        if allow_zero and value == 0 and not isinstance(value, bool):
            return 0.0
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value  # nan
                or value < MIN_SECONDS):
            least = f"0 or >= {MIN_SECONDS:g}" if allow_zero else f">= {MIN_SECONDS:g}"
            raise self.fail(f"{keypath}.{key}", f"must be a number of seconds {least}, got {_show(value)}")
        if value > MAX_SECONDS:  # inf too: the kernel's timers want a number
            raise self.fail(f"{keypath}.{key}", f"must be at most {MAX_SECONDS} seconds, got {_show(value)}")
        return float(value)

    def boolean(self, data: Dict[str, Any], key: str, keypath: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"{keypath}.{key}", f"must be true or false, got {_show(value)}")
        return value

    def octal(self, data: Dict[str, Any], key: str, keypath: str, default: str) -> int:
        value = data.get(key, default)
        if isinstance(value, str):
            try:
                mode = int(value, 8)
            except ValueError:
                mode = -1
            if 0 <= mode <= 0o777:
                return mode
        raise self.fail(f"{keypath}.{key}", f'must be an octal string such as "0660", got {_show(value)}')

    def path(self, value: str) -> str:
        if not value:
            return ""
        value = os.path.expanduser(value)
        return os.path.normpath(os.path.join(self.base_dir, value))


# -- loading ------------------------------------------------------------------

SUPERVISOR_KEYS = (
    "pidfile", "control_socket", "graceful_timeout", "working_directory",
    "umask", "user", "group", "python_path", "event_loop", "agent_check", "drain_delay",
)
LOG_KEYS = ("level", "format", "file", "access")
METRICS_KEYS = ("listen",)
SERVICE_KEYS = (
    "name", "listen", "handler", "command", "workers", "max_requests", "idle_timeout",
    "max_line_length", "backlog", "socket_mode", "reuse_port",
    "max_workers", "min_spare_workers", "max_spare_workers", "worker_connections", "line_timeout",
    "timeout", "max_rss", "proxy_protocol", "proxy_trusted",
)

#: The built-in default: echo on 127.0.0.1:7000, a dynamic pool of 4 to 64 workers (so
#: that a few clients holding connections open never lock out the next one).
BUILTIN_DEFAULT: Dict[str, Any] = {
    "service": [{"name": "echo", "listen": ["tcp://127.0.0.1:7000"], "handler": DEFAULT_HANDLER,
                 "workers": 4, "max_workers": 64}],
}


def resolve_config_path(path: Optional[str]) -> Optional[str]:
    """The file the CLI should load: *path* if given, else the system default if it
    exists, else ``None`` (meaning the built-in default configuration)."""
    if path:
        return path
    if os.path.exists(DEFAULT_CONFIG_PATH):
        return DEFAULT_CONFIG_PATH
    return None


def load_config(path: Optional[str], text: Optional[bytes] = None) -> Config:
    """Read and validate a configuration file (handlers are not imported here: see
    :func:`preforkd.handler.load_handlers`).

    :param path: the TOML file; ``None`` gives the built-in default (one ``echo``
        service on ``tcp://127.0.0.1:7000``, runtime files under
        :func:`default_runtime_dir`).
    :param text: the file's contents, already read (a reload runs exactly the bytes
        it validated); ``None`` reads *path*. Relative paths still resolve against
        *path*'s directory.
    :returns: a frozen :class:`Config`.
    :raises ConfigError: on any mistake, including an unreadable file and TOML syntax
        errors (with line and column).
    """
    if path is None:
        runtime = default_runtime_dir()
        data: Dict[str, Any] = {
            "supervisor": {
                "pidfile": os.path.join(runtime, "preforkd.pid"),
                "control_socket": os.path.join(runtime, "preforkd.sock"),
            },
            **BUILTIN_DEFAULT,
        }
        return build_config(data, "<built-in default>", os.getcwd(), "")
    source = path
    if text is None:
        text = read_config_file(path)
    try:
        document = text.decode("utf-8")
        data = tomllib.loads(document)
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "", f"not UTF-8 text (byte offset {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"invalid TOML: {_toml_message(exc, document)}") from None
    abspath = os.path.abspath(path)
    return build_config(data, source, os.path.dirname(abspath), abspath)


def read_config_file(path: str) -> bytes:
    """The bytes of the configuration file *path*, read without blocking: it must be a
    regular file (a FIFO or a device is refused without waiting on it) of at most
    :data:`MAX_CONFIG_BYTES` (see :func:`preforkd.files.read_regular_file`).

    :raises ConfigError: one line saying why it cannot be read.
    """
    try:
        return read_regular_file(path, MAX_CONFIG_BYTES)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise ConfigError(path, "", f"cannot read: larger than {MAX_CONFIG_BYTES} bytes (1 MiB)") from None
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None


def runtime_only_config(path: Optional[str]) -> Optional[Config]:
    """The file's ``[supervisor]`` table (pidfile, control socket) with the rest left at
    the built-in default, for ``status`` and ``stop`` when the file as a whole is
    invalid (a running supervisor must stay manageable after an edit broke its file);
    ``None`` when even that table cannot be read."""
    if not path:
        return None
    try:
        data = tomllib.loads(read_config_file(path).decode("utf-8"))
        sup = data.get("supervisor", {})
        abspath = os.path.abspath(path)
        return build_config({"supervisor": sup, **BUILTIN_DEFAULT}, path, os.path.dirname(abspath), abspath)
    except (OSError, ValueError, ConfigError):
        return None


def _toml_message(exc: Exception, document: str) -> str:
    # tomllib puts "(at line L, column C)" in the message; keep it on one line. For an
    # error at the very end it says "(at end of document)": name that line and column too.
    message = " ".join(str(exc).split())
    if message.endswith("(at end of document)"):
        line = document.count("\n") + 1
        column = len(document) - (document.rfind("\n") + 1) + 1
        message = message[:-1] + f", line {line}, column {column})"
    return message


def build_config(data: Dict[str, Any], source: str, base_dir: str, abspath: str) -> Config:
    """Validate an already parsed TOML document (see :func:`load_config`).

    :raises ConfigError: on any mistake.
    """
    v = _Validator(source, base_dir)
    v.table(data, "", ("supervisor", "log", "metrics", "service"))

    sup = v.table(data.get("supervisor", {}), "supervisor", SUPERVISOR_KEYS)
    python_path = sup.get("python_path", [])
    if not isinstance(python_path, list) or not all(isinstance(p, str) and p for p in python_path):
        raise v.fail("supervisor.python_path", f"must be an array of directory names, got {_show(python_path)}")
    umask = v.octal(sup, "umask", "supervisor", "022")
    supervisor = SupervisorConfig(
        pidfile=v.path(v.string(sup, "pidfile", "supervisor", "run/preforkd.pid")),
        control_socket=v.path(v.string(sup, "control_socket", "supervisor", "run/preforkd.sock")),
        graceful_timeout=v.number(sup, "graceful_timeout", "supervisor", 30),
        working_directory=v.path(v.string(sup, "working_directory", "supervisor", "/", allow_empty=False)),
        umask=umask,
        user=v.string(sup, "user", "supervisor", ""),
        group=v.string(sup, "group", "supervisor", ""),
        python_path=tuple(v.path(p) for p in python_path),
        event_loop=v.string(sup, "event_loop", "supervisor", "auto"),
        agent_check=_agent_check(v, sup),
        drain_delay=v.number(sup, "drain_delay", "supervisor", 0, allow_zero=True),
    )
    if supervisor.event_loop not in EVENT_LOOPS:
        raise v.fail("supervisor.event_loop", f"must be one of {', '.join(EVENT_LOOPS)}, got "
                     f"{_show(supervisor.event_loop)}")
    if supervisor.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise v.fail("supervisor.event_loop", 'is "uvloop" but uvloop is not installed '
                     "(pip install 'preforkd[uvloop]')")
    if supervisor.user:
        _check_user(v, supervisor.user)
    if supervisor.group:
        _check_group(v, supervisor.group)

    lg = v.table(data.get("log", {}), "log", LOG_KEYS)
    level = v.string(lg, "level", "log", "info")
    if level not in LOG_LEVELS:
        raise v.fail("log.level", f"must be one of {', '.join(LOG_LEVELS)}, got {_show(level)}")
    fmt = v.string(lg, "format", "log", "auto")
    if fmt not in LOG_FORMATS:
        raise v.fail("log.format", f"must be one of {', '.join(LOG_FORMATS)}, got {_show(fmt)}")
    access = v.boolean(lg, "access", "log", False)
    if access and LEVELS_ORDER.index(level) > LEVELS_ORDER.index("info"):
        raise v.fail("log.access", f'connection.closed is an info event: it needs level "info" or "debug", '
                     f"got level {_show(level)}")
    log = LogConfig(level=level, format=fmt, file=v.path(v.string(lg, "file", "log", "")), access=access)
    metrics = _metrics(v, data.get("metrics", {}))

    raw_services = data.get("service", [])
    if not isinstance(raw_services, list):
        raise v.fail("service", "must be an array of tables ([[service]]), got " + _show(raw_services))
    if not raw_services:
        raise v.fail("service", "at least one [[service]] is required")
    services = []
    names: Dict[str, int] = {}
    claimed: List[Tuple[Address, str]] = []  # every fixed address so far, with where it is configured

    def claim(addr: Optional[Address], where: str, label: str) -> None:
        if addr is None:
            return
        for other, owner in claimed:
            if addr.overlaps(other):
                same = addr.identity() == other.identity()
                raise v.fail(where, f"{addr} is already used by {owner}" if same
                             else f"{addr} overlaps {other} of {owner} (the same port on a wildcard address)")
        claimed.append((addr, label))

    claim(metrics.listen, "metrics.listen", "metrics.listen")
    for index, raw in enumerate(raw_services):
        kp = f"service[{index}]"
        svc = _service(v, raw, kp)
        if svc.name in names:
            raise v.fail(f"{kp}.name", f'duplicate service name "{svc.name}" (also service[{names[svc.name]}])')
        names[svc.name] = index
        for j, addr in enumerate(svc.listen):
            claim(addr, f"{kp}.listen[{j}]", f"{kp}.listen[{j}] ({svc.name})")
        services.append(svc)
    claim(supervisor.agent_check, "supervisor.agent_check", "supervisor.agent_check")
    _check_own_files(v, supervisor, log, services)

    return Config(path=abspath, supervisor=supervisor, log=log, services=tuple(services), metrics=metrics)


def _metrics(v: _Validator, raw: Any) -> MetricsConfig:
    """``[metrics]``: ``listen`` is "" (off) or a ``tcp://`` address (Prometheus scrapes over TCP)."""
    table = v.table(raw, "metrics", METRICS_KEYS)
    text = v.string(table, "listen", "metrics", "")
    if not text:
        return MetricsConfig()
    try:
        addr = parse_address(text, v.base_dir)
    except AddressError as exc:
        raise v.fail("metrics.listen", str(exc)) from None
    if addr.kind != "tcp":
        raise v.fail("metrics.listen", f"must be a tcp:// address (Prometheus scrapes over TCP), got {_show(text)}")
    return MetricsConfig(listen=addr)


def _service(v: _Validator, raw: Any, kp: str) -> ServiceConfig:
    svc = v.table(raw, kp, SERVICE_KEYS)
    name = v.string(svc, "name", kp, "", allow_empty=False) if "name" in svc else None
    if name is None:
        raise v.fail(f"{kp}.name", "is required")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise v.fail(f"{kp}.name", f"must use only letters, digits, '-', '_' and '.', got {_show(name)}")
    listen_raw = svc.get("listen")
    if listen_raw is None:
        raise v.fail(f"{kp}.listen", 'is required (e.g. ["tcp://127.0.0.1:7000"])')
    if isinstance(listen_raw, str):
        listen_raw = [listen_raw]
    if not isinstance(listen_raw, list) or not listen_raw:
        raise v.fail(f"{kp}.listen", f"must be a non-empty array of addresses, got {_show(listen_raw)}")
    listen = []
    seen = set()
    for j, item in enumerate(listen_raw):
        if not isinstance(item, str):
            raise v.fail(f"{kp}.listen[{j}]", f"must be a string, got {_show(item)}")
        try:
            addr = parse_address(item, v.base_dir)
        except AddressError as exc:
            raise v.fail(f"{kp}.listen[{j}]", str(exc)) from None
        key = addr.identity()
        if key is not None and key in seen:
            raise v.fail(f"{kp}.listen[{j}]", f"{addr} is listed twice")
        seen.add(key)
        listen.append(addr)

    if "handler" in svc and "command" in svc:
        raise v.fail(kp, "give either handler or command, not both")
    command: Tuple[str, ...] = ()
    handler = ""
    if "command" in svc:
        cmd = svc["command"]
        if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd) or not cmd[0]:
            raise v.fail(f"{kp}.command", f'must be a non-empty array of strings (no shell), got {_show(cmd)}')
        program = cmd[0]
        if "/" not in program:
            found = _which(program)
            if found is None:
                raise v.fail(f"{kp}.command[0]", f"{_show(program)} not found in PATH {SAFE_PATH}")
            program = found
        else:
            program = v.path(program)
        if not os.path.isfile(program) or not os.access(program, os.X_OK):
            raise v.fail(f"{kp}.command[0]", f"{_show(program)} is not an executable file")
        command = (program, *cmd[1:])
    else:
        handler = v.string(svc, "handler", kp, DEFAULT_HANDLER, allow_empty=False)
        module, _, attr = handler.partition(":")
        if not module or not attr or not all(part.isidentifier() for part in module.split(".") + attr.split(".")):
            raise v.fail(f"{kp}.handler", f'must be "module:attribute", got {_show(handler)}')

    workers = v.integer(svc, "workers", kp, 4, 1, MAX_WORKERS)
    max_workers = v.integer(svc, "max_workers", kp, workers, 1, MAX_WORKERS)
    if max_workers < workers:
        raise v.fail(f"{kp}.max_workers", f"must be at least workers ({workers}), got {max_workers}")
    min_spare = v.integer(svc, "min_spare_workers", kp, 1, 1, MAX_WORKERS)
    max_spare = v.integer(svc, "max_spare_workers", kp, max(4, 2 * min_spare), 2, MAX_WORKERS)
    if max_spare <= min_spare:
        raise v.fail(f"{kp}.max_spare_workers", f"must be greater than min_spare_workers ({min_spare}), "
                     f"got {max_spare}")
    worker_connections = v.integer(svc, "worker_connections", kp, 1, 1, MAX_WORKER_CONNECTIONS)
    if command and worker_connections > 1:
        raise v.fail(f"{kp}.worker_connections", "a command service serves one connection per worker "
                     f"(its program owns the socket): must be 1, got {worker_connections}")
    proxy_protocol = v.boolean(svc, "proxy_protocol", kp, False)
    proxy_trusted = _networks(v, svc, kp)
    return ServiceConfig(
        name=name,
        listen=tuple(listen),
        handler=handler,
        command=command,
        workers=workers,
        max_workers=max_workers,
        min_spare_workers=min_spare,
        max_spare_workers=max_spare,
        worker_connections=worker_connections,
        line_timeout=v.number(svc, "line_timeout", kp, 60),
        timeout=_timeout(v, svc, kp),
        max_rss=v.integer(svc, "max_rss", kp, 0, 0, 1 << 30),
        max_requests=v.integer(svc, "max_requests", kp, 0, 0),
        idle_timeout=v.number(svc, "idle_timeout", kp, 300),
        max_line_length=v.integer(svc, "max_line_length", kp, 8192, 1),
        backlog=v.integer(svc, "backlog", kp, 1024, 1, MAX_BACKLOG),
        socket_mode=v.octal(svc, "socket_mode", kp, "0660"),
        reuse_port=v.boolean(svc, "reuse_port", kp, False),
        proxy_protocol=proxy_protocol,
        proxy_trusted=proxy_trusted,
    )


def _timeout(v: _Validator, svc: Dict[str, Any], kp: str) -> float:
    """``timeout``: 0 (off) or at least 1 second (workers beat every quarter of it)."""
    if svc.get("timeout", 30) == 0 and not isinstance(svc.get("timeout"), bool):
        return 0.0
    value = v.number(svc, "timeout", kp, 30)
    if value < 1:
        raise v.fail(f"{kp}.timeout", f"must be 0 (off) or at least 1 second, got {_show(svc['timeout'])}")
    return value


def _networks(v: _Validator, svc: Dict[str, Any], kp: str) -> Tuple[str, ...]:
    """``proxy_trusted``: CIDR networks (or single addresses), each checked with
    :mod:`ipaddress` (host bits set are an error: ``10.0.0.1/8`` is a typo for
    something), kept as their normalised text."""
    raw = svc.get("proxy_trusted", list(DEFAULT_PROXY_TRUSTED))
    if not isinstance(raw, list):
        raise v.fail(f"{kp}.proxy_trusted", f'must be an array of networks such as "10.0.0.0/8", got {_show(raw)}')
    out = []
    for j, item in enumerate(raw):
        if not isinstance(item, str):
            raise v.fail(f"{kp}.proxy_trusted[{j}]", f"must be a string, got {_show(item)}")
        try:
            out.append(str(ipaddress.ip_network(item, strict=True)))
        except ValueError as exc:
            raise v.fail(f"{kp}.proxy_trusted[{j}]", f"not a network: {exc}") from None
    return tuple(out)


def _agent_check(v: _Validator, sup: Dict[str, Any]) -> Optional[Address]:
    """``agent_check``: "" (off) or a ``tcp://`` address (HAProxy's agent connects over TCP)."""
    text = v.string(sup, "agent_check", "supervisor", "")
    if not text:
        return None
    try:
        addr = parse_address(text, v.base_dir)
    except AddressError as exc:
        raise v.fail("supervisor.agent_check", str(exc)) from None
    if addr.kind != "tcp":
        raise v.fail("supervisor.agent_check", f"must be a tcp:// address (HAProxy connects over TCP), "
                     f"got {_show(text)}")
    return addr


def _check_own_files(v: _Validator, supervisor: SupervisorConfig, log: LogConfig,
                     services: List[ServiceConfig]) -> None:
    """The pidfile, the control socket, the log file and the Unix listeners are
    distinct files: one path used twice would only fail at start-up, confusingly."""
    owners: Dict[str, str] = {}
    for keypath, path in (("supervisor.pidfile", supervisor.pidfile),
                          ("supervisor.control_socket", supervisor.control_socket), ("log.file", log.file)):
        if path and path in owners:
            raise v.fail(keypath, f"{path} is also {owners[path]}")
        if path:
            owners[path] = keypath
    for index, svc in enumerate(services):
        for j, addr in enumerate(svc.listen):
            if addr.kind == "unix" and addr.path in owners:
                raise v.fail(f"service[{index}].listen[{j}]", f"{addr} is the same file as {owners[addr.path]}")


def _which(program: str) -> Optional[str]:
    for d in SAFE_PATH.split(":"):
        candidate = os.path.join(d, program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _check_user(v: _Validator, user: str) -> None:
    try:
        pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise v.fail("supervisor.user", f"no such user {_show(user)}") from None


def _check_group(v: _Validator, group: str) -> None:
    try:
        grp.getgrnam(group) if not group.isdigit() else grp.getgrgid(int(group))
    except KeyError:
        raise v.fail("supervisor.group", f"no such group {_show(group)}") from None


@dataclass(frozen=True)
class Credentials:
    """Who workers run as: ``supervisor.user`` and ``supervisor.group`` resolved to ids
    (``None`` = unchanged); *user* is the name for ``initgroups(3)``."""

    uid: Optional[int]
    gid: Optional[int]
    user: str

    def assume(self) -> None:
        """Become these credentials, when root: setgid, initgroups/setgroups, setuid, in
        that order (credentials(7)). A worker does this after ``fork``; so does a
        reload's check before it runs ``worker_init``.

        :raises OSError: when the kernel refuses.
        """
        if os.geteuid() != 0:
            return
        if self.gid is not None:
            os.setgid(self.gid)
            if self.user:
                os.initgroups(self.user, self.gid)
            else:
                os.setgroups([self.gid])
        if self.uid is not None:
            os.setuid(self.uid)

    @property
    def socket_owner(self) -> Tuple[int, int]:
        """``(uid, gid)`` for ``chown`` of Unix socket files; -1 leaves one unchanged."""
        return (-1 if self.uid is None else self.uid, -1 if self.gid is None else self.gid)


def credentials(config: Config) -> Credentials:
    """Resolve ``supervisor.user``/``group`` (names or numeric ids, see passwd(5)).

    :raises KeyError: when the user or group has vanished since validation.
    """
    uid = gid = None
    user = config.supervisor.user
    if user:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid, user = pw.pw_uid, pw.pw_gid, pw.pw_name
    group = config.supervisor.group
    if group:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    return Credentials(uid=uid, gid=gid, user=user)
