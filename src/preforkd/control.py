"""The control socket: a Unix stream socket (mode 0600) speaking a line protocol.

Commands, one line each; the reply is one line, then the server closes:

* ``status`` — the status document as one JSON object (see ``docs/operations.md``, Status);
* ``ping`` — ``pong``;
* the master's own commands (``drain``, ``undrain``: see ``docs/scale-out.md``), each
  answering one line.

Everything is non-blocking and driven by the master's selector, so a slow or
silent client never stalls the master loop; a client gets
:data:`CLIENT_TIMEOUT` seconds to send its line and read the reply.

The serving is an :class:`~preforkd.endpoints.Endpoint`, like the master's other
endpoints. Many clients at once: the socket listens with a backlog of :data:`BACKLOG`
and the master accepts until the queue is empty (at most :data:`ACCEPT_BATCH` per
wake-up, so that the loop's other work goes on; :data:`MAX_CLIENTS` held at once).
Out of descriptors (``EMFILE``, ``ENFILE``) the master stops watching the socket for
:data:`ACCEPT_PAUSE` seconds instead of waking again at once for a connection it
cannot take (a busy loop): the clients wait in the
queue and are served once descriptors are free again (``control.accept_paused``, once
per episode). A client finding the queue full (``EAGAIN`` on ``connect``) retries
until its timeout (:func:`query`).
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import time
from typing import Any, Callable, Dict, Optional, Tuple

from .addresses import Address
from .endpoints import Endpoint
from .files import UnsafePathError, ensure_runtime_dir
from .listeners import Listener, ListenerError, bind_unix, unlink_if_ours
from .log import Logger

#: Seconds a control client has to send its line and read the reply.
CLIENT_TIMEOUT = 5.0
MAX_REQUEST = 1024
#: listen(2) backlog of the control socket (capped by net.core.somaxconn).
BACKLOG = 512
#: Connections accepted in one wake-up at most.
ACCEPT_BATCH = 256
#: Clients held at once (each a descriptor); more wait in the accept queue.
MAX_CLIENTS = 256
#: Seconds the master stops accepting after running out of descriptors.
ACCEPT_PAUSE = 0.25


class ControlServer:
    """Serves the control protocol from inside the master loop: the socket file's life
    (bind, adopt across a reload, remove) is here; the serving is an
    :class:`~preforkd.endpoints.Endpoint`, like the master's other endpoints.

    :param status: a callable returning the status document (a JSON-able dict).
    :param commands: more commands: name -> a callable returning the reply line.
    :param logger: where ``control.accept_paused`` goes.
    """

    def __init__(self, selector: selectors.BaseSelector, status: Callable[[], Dict[str, Any]],
                 commands: Optional[Dict[str, Callable[[], str]]], logger: Logger) -> None:
        self.selector = selector
        self.status = status
        self.commands = commands or {}
        self.logger = logger
        self.endpoint: Optional[Endpoint] = None
        self.path = ""
        self.file_id: Optional[Tuple[int, int]] = None

    def bind(self, path: str) -> None:
        """Create the socket file at *path* (mode 0600, parents created).

        :raises ListenerError: when *path* is taken by a live server or is not a socket.
        """
        try:
            ensure_runtime_dir(os.path.dirname(path) or ".")
            lst = bind_unix(Address(kind="unix", path=path), backlog=BACKLOG, mode=0o600)
        except (ListenerError, UnsafePathError) as exc:
            raise ListenerError(f"control socket: {exc}") from None
        self._use(lst.sock, path, lst.file_id)

    def adopt(self, fd: int, path: str, file_id: Optional[Tuple[int, int]]) -> None:
        """Keep serving on an inherited control socket (re-exec)."""
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        self._use(sock, path, file_id)

    def take_over(self, path: str, inherited_fd: Optional[int], inherited_path: str,
                  inherited_file_id: Optional[Tuple[int, int]]) -> None:
        """Serve at *path* ("" for none): on the inherited socket when a reload kept the
        path, else on a new one; an inherited socket at another path is closed and its
        file removed.

        :raises ListenerError: see :meth:`bind`.
        """
        if inherited_fd is not None and path and inherited_path == path:
            self.adopt(inherited_fd, path, inherited_file_id)
            return
        if inherited_fd is not None:
            old = ControlServer(selectors.DefaultSelector(), self.status, None, self.logger)
            old.adopt(inherited_fd, inherited_path, inherited_file_id)
            old.close(unlink=True)
        if path:
            self.bind(path)

    def _use(self, sock: socket.socket, path: str, file_id: Optional[Tuple[int, int]]) -> None:
        self.path, self.file_id = path, file_id
        listener = Listener(address=Address(kind="unix", path=path), sock=sock, bound=f"unix:{path}",
                            file_id=file_id, role="control")
        self.endpoint = Endpoint("control", listener, self.selector, self._respond, self.logger,
                                 terminators=(b"\n",), max_request=MAX_REQUEST, timeout=CLIENT_TIMEOUT,
                                 max_clients=MAX_CLIENTS, accept_batch=ACCEPT_BATCH, accept_backoff=ACCEPT_PAUSE,
                                 failed_event="control.accept_paused")
        self.endpoint.start()

    def fileno(self) -> Optional[int]:
        return self.endpoint.listener.sock.fileno() if self.endpoint else None

    def _respond(self, request: bytes) -> bytes:
        return (self._answer(request.split(b"\n", 1)[0].strip().decode("utf-8", "replace")) + "\n").encode()

    def _answer(self, line: str) -> str:
        cmd = line.split()[0].lower() if line.split() else ""
        if cmd == "status":
            return json.dumps(self.status(), separators=(",", ":"))
        if cmd == "ping":
            return "pong"
        if cmd in self.commands:
            return self.commands[cmd]()
        return json.dumps({"error": f"unknown command {line[:40]!r}; try status or ping"})

    def deadline(self) -> Optional[float]:
        """When :meth:`expire` next has work (monotonic seconds), if ever."""
        return self.endpoint.deadline() if self.endpoint else None

    def expire(self, now: float) -> None:
        """Drop clients that overran :data:`CLIENT_TIMEOUT`, and accept again after a pause
        for want of descriptors (*now*: monotonic seconds)."""
        if self.endpoint is not None:
            self.endpoint.tick(now)

    def close_clients(self) -> None:
        """Drop every client (before a re-exec: their sockets are not handed over)."""
        if self.endpoint is not None:
            self.endpoint.close_clients()

    def close(self, unlink: bool = True) -> None:
        """Stop serving; remove the socket file if it is still ours."""
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint.listener.sock.close()
            self.endpoint = None
        if unlink and self.file_id:
            unlink_if_ours(self.path, self.file_id)


def query(path: str, command: str = "status", timeout: float = 5.0) -> str:
    """Send one command to the control socket at *path* and return the reply line.

    A full accept queue (``EAGAIN`` from a Unix socket's ``connect``, unix(7)) is
    retried until *timeout* seconds have passed.

    :raises OSError: when nothing answers there (no such file, refused, timeout).
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        while True:
            try:
                sock.connect(path)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(errno.ETIMEDOUT, f"{path}: accept queue full") from None
                time.sleep(0.01)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode("utf-8").strip()


#: What the command line reads of a status document (``status``, ``top``, ``reload``):
#: its keys and their types, at the top, in ``reload``, per service, per listener and
#: per worker; more keys are fine, a missing or mistyped one makes it no status document.
_NUMBER = (int, float)
_OPTIONAL_STR = (str, type(None))
_OPTIONAL_LIST = (list, type(None))
_DOCUMENT = {"pid": int, "state": str, "generation": int, "uptime": _NUMBER, "config": str, "reload": dict,
             "services": list}
_RELOAD = {"seq": int, "state": str}
_SERVICE = {"name": str, "handler": _OPTIONAL_STR, "command": _OPTIONAL_LIST, "listeners": list, "workers": list}
_LISTENER = {"address": str}
_WORKER = {"pid": int, "number": int, "generation": int, "state": str, "connections": int}


def _check_keys(what: str, item: Any, keys: Dict[str, Any]) -> None:
    if not isinstance(item, dict):
        raise ValueError(f"not a status document ({what} is not an object)")
    for key, types in keys.items():
        if key not in item:
            raise ValueError(f"not a status document (no {what}.{key})")
        if not isinstance(item[key], types) or isinstance(item[key], bool):
            raise ValueError(f"not a status document ({what}.{key} is {type(item[key]).__name__})")


def check_status(doc: Any) -> Dict[str, Any]:
    """*doc* if it has what the command line reads of a status document.

    :raises ValueError: saying what is missing (another program's reply, or a master
        of another version).
    """
    _check_keys("status", doc, _DOCUMENT)
    _check_keys("reload", doc["reload"], _RELOAD)
    for svc in doc["services"]:
        _check_keys("service", svc, _SERVICE)
        for lst in svc["listeners"]:
            _check_keys("listener", lst, _LISTENER)
        for worker in svc["workers"]:
            _check_keys("worker", worker, _WORKER)
    return dict(doc)


def query_status(path: str, timeout: float = 5.0) -> Dict[str, Any]:
    """The master's status document.

    :raises OSError: nothing answers at *path*.
    :raises ValueError: the reply is not a status document (:func:`check_status`).
    """
    return check_status(json.loads(query(path, "status", timeout)))
