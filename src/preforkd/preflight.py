"""What ``preforkd check`` verifies beyond the configuration's own validity: that it
can start *for the user running the check*, as far as that can be told without binding
a socket or forking a worker.

* The directories of the pidfile, the control socket, the log file and each Unix
  listener exist and are writable and searchable, or can be created (the nearest
  existing ancestor is writable); an existing pidfile or log file is writable. A
  read-only file system (systemd's ``ProtectSystem=strict`` outside the unit's own
  directories) fails here too, since ``access(2)`` reports it.
* ``working_directory`` is a directory (``preforkd start`` changes into it).
* Warnings, which do not fail the check: ``supervisor.user``/``group`` are ignored
  when preforkd does not run as root; a TCP port below
  ``net.ipv4.ip_unprivileged_port_start`` needs root or ``CAP_NET_BIND_SERVICE``
  unless systemd passes the socket (socket activation).

A Unix socket file that already exists is left alone: a running supervisor (or
systemd, for an activated socket) holds it, and a reload keeps it without binding.
The same goes for the control socket. Users and groups named in the configuration
are checked when it is loaded (:mod:`preforkd.config`); handler signatures by
:func:`preforkd.handler.load_handlers`.
"""

from __future__ import annotations

import os
import pwd
import stat
from typing import List, Tuple

from .config import Config, ConfigError

#: Linux capability number of CAP_NET_BIND_SERVICE (capability.h).
CAP_NET_BIND_SERVICE = 10


def preflight(config: Config) -> Tuple[List[str], List[str]]:
    """Check that *config* can start for the effective user of this process.

    :returns: ``(errors, warnings)``, each a list of one-line messages in
        :class:`~preforkd.config.ConfigError`'s form (``FILE: KEY.PATH: what``);
        no errors means nothing found that would stop ``run`` or ``start``.
    """
    errors: List[str] = []
    warnings: List[str] = []
    source = config.source
    sup = config.supervisor
    files = [("supervisor.pidfile", sup.pidfile, False), ("supervisor.control_socket", sup.control_socket, True),
             ("log.file", config.log.file, False)]
    for index, svc in enumerate(config.services):
        for j, addr in enumerate(svc.listen):
            if addr.kind == "unix" and addr.path:
                files.append((f"service[{index}].listen[{j}]", addr.path, True))
    for keypath, path, is_socket in files:
        if not path:
            continue
        problem = _socket_file_problem(path) if is_socket else _file_problem(path)
        if problem:
            errors.append(str(ConfigError(source, keypath, problem)))
    wd = sup.working_directory
    if not os.path.isdir(wd):
        errors.append(str(ConfigError(source, "supervisor.working_directory", f"{wd} is not a directory")))
    elif not os.access(wd, os.X_OK, effective_ids=True):
        errors.append(str(ConfigError(source, "supervisor.working_directory", f"{wd} is not searchable by {_who()}")))

    if os.geteuid() != 0:
        for key in ("user", "group"):
            if getattr(sup, key):
                warnings.append(str(ConfigError(
                    source, f"supervisor.{key}",
                    f"ignored: preforkd runs as {_who()}, not root, and its workers run as that user too")))
    first_free = _unprivileged_port_start()
    if os.geteuid() != 0 and not _has_capability(CAP_NET_BIND_SERVICE):
        for index, svc in enumerate(config.services):
            for j, addr in enumerate(svc.listen):
                if addr.kind == "tcp" and 0 < (addr.port or 0) < first_free:
                    warnings.append(str(ConfigError(
                        source, f"service[{index}].listen[{j}]",
                        f"port {addr.port} needs root or CAP_NET_BIND_SERVICE ({_who()}), "
                        "unless systemd passes the socket")))
    return errors, warnings


def _who() -> str:
    """``uid 1000 (alice)``: the effective user, as the messages name it."""
    uid = os.geteuid()
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _file_problem(path: str) -> str:
    """Why a regular file at *path* (pidfile, log) cannot be opened for writing, or ""."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _directory_problem(os.path.dirname(path), path)
    except OSError as exc:
        return f"cannot reach {path}: {exc.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return f"{path} is a directory"
    if not os.access(path, os.W_OK, effective_ids=True):
        return f"{path} is not writable by {_who()}{_read_only_note(path)}"
    return ""


def _socket_file_problem(path: str) -> str:
    """Why a Unix socket cannot be created at *path*, or "" (also when one exists)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return _directory_problem(os.path.dirname(path), path)
    except OSError as exc:
        return f"cannot reach {path}: {exc.strerror}"
    if stat.S_ISSOCK(st.st_mode):
        return ""
    return _directory_problem(os.path.dirname(path), path)


def _directory_problem(directory: str, path: str) -> str:
    """Why files cannot be created in *directory* (made with its parents when
    missing, as the supervisor does), or ""."""
    probe = directory or "."
    missing = False
    while not os.path.lexists(probe):
        missing = True
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"cannot create {path}: {probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK, effective_ids=True):
        if missing:
            return (f"cannot create {directory}: {probe} is not writable by {_who()}"
                    f"{_read_only_note(probe)}")
        return f"directory {directory} is not writable by {_who()}{_read_only_note(probe)}"
    return ""


def _read_only_note(path: str) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return " (read-only file system)"
    except OSError:
        pass
    return ""


def _unprivileged_port_start() -> int:
    """``net.ipv4.ip_unprivileged_port_start`` (1024 when unknown)."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1024


def _has_capability(cap: int) -> bool:
    """Is capability number *cap* in this process's effective set (``/proc/self/status``)?"""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        pass
    return False
