"""What crosses ``execve`` on a reload, and the signal mask around it.

The running master describes everything the new image takes over in one
:class:`Handover`: a frozen, versioned dataclass, written once
(:meth:`Handover.encode`, JSON in the environment variable ``PREFORKD_STATE``) and
parsed and validated once (:meth:`Handover.decode`), field by field against its
type annotations, before the new image touches anything. ``docs/reload.md``
describes the type.

Every descriptor it names has ``FD_CLOEXEC`` cleared just before ``execve`` and set
again by the new image as soon as it adopts it. The signals the master handles
(:data:`preforkd.signals.BLOCKED_ACROSS_EXEC`) are blocked across ``execve`` (a
blocked signal stays pending through exec, signal(7)) and unblocked once the new
image has installed its handlers, so a HUP that arrives while the new image starts
is neither fatal nor lost; perlipc's SA_NODEFER lesson is why the mask is set back
explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterable, List, Optional, Tuple, Type, TypeVar

from .signals import BLOCKED_ACROSS_EXEC

STATE_ENV = "PREFORKD_STATE"
#: The configuration file's text as the reloading master validated it, for its
#: ``check`` subprocess and its new image: both use these bytes, not the file, so an
#: edit landing between the check and the new image's start-up cannot make it fail.
CONFIG_ENV = "PREFORKD_CONFIG_TEXT"
#: Larger files are not passed (one environment string is limited to 128 KiB on
#: Linux); the new image then reads the file.
CONFIG_ENV_MAX = 65536
#: Set for a reload's ``check`` subprocess: it then also prints the hand-over
#: version its code speaks, so that a master never execs into code that could not
#: read what it hands over.
VERSION_PROBE_ENV = "PREFORKD_HANDOVER_PROBE"


class HandoverError(ValueError):
    """``PREFORKD_STATE`` is present but is not a hand-over this code can read."""


@dataclass(frozen=True)
class InheritedListener:
    """A listening socket crossing exec."""

    fd: int
    key: str  # see preforkd.listeners.listener_specs
    address: str  # as configured
    origin: str  # bound | inherited | activated
    file_id: Optional[Tuple[int, int]]  # (st_dev, st_ino) of a Unix socket file we created


@dataclass(frozen=True)
class InheritedWorker:
    """A live worker of this or an earlier generation; the new master reaps it."""

    pid: int
    service: str
    number: int
    generation: int
    slot: int  # scoreboard slot
    ready: bool
    stopping: bool
    started_wall: float  # wall clock (time.time()), seconds since the epoch


@dataclass(frozen=True)
class Count:
    """One of the master's running totals (:class:`preforkd.counters.Counters`):
    ``name`` (``retired``, ``worker_exits``, ``reloads``), its ``labels`` in order,
    and its ``value``."""

    name: str
    labels: Tuple[str, ...]
    value: int


@dataclass(frozen=True)
class Handover:
    """Everything a re-exec'd master takes over from the image before it."""

    VERSION: ClassVar[int] = 3

    generation: int  # the old image's; the new one is +1
    started_wall: float  # first start, wall clock (time.time()) seconds
    hup_monotonic: float  # when this reload began, CLOCK_MONOTONIC seconds (survives exec)
    reload_seq: int  # which reload this is
    pending_reload: bool  # a HUP arrived during this reload: reload again once ready
    listeners: Tuple[InheritedListener, ...]
    workers: Tuple[InheritedWorker, ...]
    scoreboard_fd: int
    alive_r: int  # the master-alive pipe (workers hold the read end)
    alive_w: int
    pidfile_fd: Optional[int]  # still locked
    pidfile_path: str
    control_fd: Optional[int]
    control_path: str
    control_file_id: Optional[Tuple[int, int]]
    counters: Tuple[Count, ...]  # the master's running totals (metrics never go backwards)
    drained: bool = False  # taken out of rotation with ``preforkd drain`` (the agent says "drain")

    def fds(self) -> List[int]:
        """Every descriptor that must survive ``execve``."""
        fds = [lst.fd for lst in self.listeners] + [self.scoreboard_fd, self.alive_r, self.alive_w]
        return fds + [fd for fd in (self.pidfile_fd, self.control_fd) if fd is not None]

    def encode(self) -> str:
        """One line of JSON: ``{"version": 3, "generation": ..., ...}``."""
        return json.dumps({"version": self.VERSION, **dataclasses.asdict(self)}, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> Handover:
        """Parse and validate :meth:`encode`'s output.

        :raises HandoverError: naming the first field that is missing, unknown or of
            the wrong type, or a version this code does not speak.
        """
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise HandoverError(f"{STATE_ENV} is not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != cls.VERSION:
            version = data.get("version") if isinstance(data, dict) else None
            raise HandoverError(f"{STATE_ENV} has version {version!r}; this preforkd reads {cls.VERSION}")
        del data["version"]
        return _build(cls, data, "")


T = TypeVar("T")


def _build(cls: Type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise HandoverError(f"{STATE_ENV}{where}: expected an object")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        raise HandoverError(f"{STATE_ENV}{where}: unknown field {sorted(unknown)[0]!r}")
    values = {}
    for name in fields:
        if name not in data:
            raise HandoverError(f"{STATE_ENV}{where}: missing field {name!r}")
        values[name] = _value(hints[name], data[name], f"{where}.{name}")
    return cls(**values)


def _value(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _value(next(a for a in args if a is not type(None)), value, where)
    if origin is tuple:
        if not isinstance(value, list) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise HandoverError(f"{STATE_ENV}{where}: expected an array")
        items = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        return tuple(_value(h, v, f"{where}[{i}]") for i, (h, v) in enumerate(zip(items, value, strict=True)))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not hint:  # bool is not an int here
        raise HandoverError(f"{STATE_ENV}{where}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def take_handover(environ: Optional[Dict[str, str]] = None) -> Optional[Handover]:
    """Read and remove ``PREFORKD_STATE`` from the environment.

    :returns: the hand-over, or ``None`` for a fresh start.
    :raises HandoverError: when the variable is present but not a valid hand-over.
    """
    env = os.environ if environ is None else environ
    text = env.pop(STATE_ENV, None)
    return Handover.decode(text) if text else None


def config_env(text: Optional[bytes]) -> Dict[str, str]:
    """``{CONFIG_ENV: text}`` for a validated (so UTF-8) configuration text, or ``{}``."""
    if text is None or len(text) > CONFIG_ENV_MAX:
        return {}
    return {CONFIG_ENV: text.decode("utf-8")}


def set_inheritable(fds: Iterable[int], inheritable: bool) -> None:
    """Clear (or set again) ``FD_CLOEXEC`` on *fds*, ignoring closed ones."""
    for fd in fds:
        try:
            os.set_inheritable(fd, inheritable)
        except OSError:
            pass


def exec_argv(config_arg: Optional[str]) -> List[str]:
    """The command line of the new image: the same interpreter running
    ``-m preforkd run`` (the new image never daemonizes again: it already is)."""
    argv = [sys.executable, "-m", "preforkd", "run"]
    if config_arg:
        argv += ["-c", config_arg]
    return argv


def reexec(handover: Handover, config_arg: Optional[str], config_text: Optional[bytes] = None) -> OSError:
    """Replace this process with a new image of preforkd, handing *handover* over
    (and *config_text*, the validated configuration, in :data:`CONFIG_ENV`).

    Does not return on success. On failure everything is put back (descriptors
    close-on-exec again, signals unblocked) and the error is returned for the caller
    to log.
    """
    fds = handover.fds()
    env = dict(os.environ)
    env[STATE_ENV] = handover.encode()
    env.update(config_env(config_text))
    argv = exec_argv(config_arg)
    set_inheritable(fds, True)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_ACROSS_EXEC)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(argv[0], argv, env)
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        set_inheritable(fds, False)
        return exc
    raise AssertionError("unreachable")  # pragma: no cover


def unblock_signals() -> None:
    """Unblock what :func:`reexec` blocked (call after installing handlers)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED_ACROSS_EXEC)
