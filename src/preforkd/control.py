"""The control socket: a Unix stream socket (mode 0600) speaking a line protocol.

Commands, one line each; the reply is one line, then the server closes:

* ``status`` — the status document as one JSON object (see ``docs/operations.md``, Status);
* ``ping`` — ``pong``;
* the master's own commands (``drain``, ``undrain``: see ``docs/scale-out.md``), each
  answering one line.

Everything is non-blocking and driven by the master's selector, so a slow or
silent client never stalls the master loop; a client gets
:data:`CLIENT_TIMEOUT` seconds to send its line and read the reply.

Many clients at once: the socket listens with a backlog of :data:`BACKLOG` and the
master accepts until the queue is empty (at most :data:`ACCEPT_BATCH` per wake-up, so
that the loop's other work goes on). Out of descriptors (``EMFILE``, ``ENFILE``) the
master stops watching the socket for :data:`ACCEPT_PAUSE` seconds instead of waking
again at once for a connection it cannot take (a busy loop): the clients wait in the
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
from .files import UnsafePathError, ensure_runtime_dir
from .listeners import ListenerError, bind_unix, unlink_if_ours
from .log import Logger

#: Seconds a control client has to send its line and read the reply.
CLIENT_TIMEOUT = 5.0
MAX_REQUEST = 1024
#: listen(2) backlog of the control socket (capped by net.core.somaxconn).
BACKLOG = 512
#: Connections accepted in one wake-up at most.
ACCEPT_BATCH = 256
#: Seconds the master stops accepting after running out of descriptors.
ACCEPT_PAUSE = 0.25
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Client:
    __slots__ = ("deadline", "inbuf", "outbuf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""
        self.deadline = time.monotonic() + CLIENT_TIMEOUT  # monotonic seconds


class ControlServer:
    """Serves the control protocol from inside the master loop.

    :param status: a callable returning the status document (a JSON-able dict).
    :param commands: more commands: name -> a callable returning the reply line.
    :param logger: where ``control.accept_paused`` goes (``None``: nowhere).
    """

    def __init__(self, selector: selectors.BaseSelector, status: Callable[[], Dict[str, Any]],
                 commands: Optional[Dict[str, Callable[[], str]]] = None, logger: Optional[Logger] = None) -> None:
        self.selector = selector
        self.status = status
        self.commands = commands or {}
        self.logger = logger
        self.sock: Optional[socket.socket] = None
        self.path = ""
        self.file_id: Optional[Tuple[int, int]] = None
        self.clients: Dict[int, _Client] = {}
        #: While out of descriptors: when to watch the socket again (monotonic seconds).
        self.paused_until: Optional[float] = None
        self._pause_logged = False

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
            old = ControlServer(selectors.DefaultSelector(), self.status)
            old.adopt(inherited_fd, inherited_path, inherited_file_id)
            old.close(unlink=True)
        if path:
            self.bind(path)

    def _use(self, sock: socket.socket, path: str, file_id: Optional[Tuple[int, int]]) -> None:
        sock.setblocking(False)
        self.sock, self.path, self.file_id = sock, path, file_id
        self.selector.register(sock, selectors.EVENT_READ, self._on_accept)

    def fileno(self) -> Optional[int]:
        return self.sock.fileno() if self.sock else None

    def _on_accept(self, _mask: int) -> None:
        """Accept what is queued (see the module's notes on many clients)."""
        assert self.sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                if exc.errno in _OUT_OF_FDS:
                    self._pause(exc)
                    return
                raise
            self._pause_logged = False
            conn.setblocking(False)
            client = _Client(conn)
            self.clients[conn.fileno()] = client
            self.selector.register(conn, selectors.EVENT_READ, lambda mask, c=client: self._on_client(c, mask))

    def _on_client(self, client: _Client, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and not client.outbuf:
                data = client.sock.recv(4096)
                if not data:
                    return self._drop(client)
                client.inbuf += data
                if b"\n" in client.inbuf:
                    line = client.inbuf.split(b"\n", 1)[0].strip().decode("utf-8", "replace")
                    client.outbuf = (self._answer(line) + "\n").encode("utf-8")
                    self.selector.modify(client.sock, selectors.EVENT_WRITE,
                                         lambda m, c=client: self._on_client(c, m))
                elif len(client.inbuf) > MAX_REQUEST:
                    return self._drop(client)
            if mask & selectors.EVENT_WRITE and client.outbuf:
                sent = client.sock.send(client.outbuf)
                client.outbuf = client.outbuf[sent:]
                if not client.outbuf:
                    self._drop(client)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(client)

    def _answer(self, line: str) -> str:
        cmd = line.split()[0].lower() if line.split() else ""
        if cmd == "status":
            return json.dumps(self.status(), separators=(",", ":"))
        if cmd == "ping":
            return "pong"
        if cmd in self.commands:
            return self.commands[cmd]()
        return json.dumps({"error": f"unknown command {line[:40]!r}; try status or ping"})

    def _drop(self, client: _Client) -> None:
        self.clients.pop(client.sock.fileno(), None)
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()

    def _pause(self, exc: OSError) -> None:
        """Out of descriptors: stop watching the socket for :data:`ACCEPT_PAUSE` seconds."""
        assert self.sock is not None
        try:
            self.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.paused_until = time.monotonic() + ACCEPT_PAUSE
        if not self._pause_logged and self.logger is not None:
            self._pause_logged = True
            self.logger.warning("control.accept_paused", error=exc.strerror, clients=len(self.clients),
                                pause=ACCEPT_PAUSE)

    def deadline(self) -> Optional[float]:
        """When :meth:`expire` must run to watch the socket again (monotonic seconds), if paused."""
        return self.paused_until

    def expire(self, now: float) -> None:
        """Drop clients that overran :data:`CLIENT_TIMEOUT`, and watch the socket again
        after a pause (*now*: monotonic seconds)."""
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            self._drop(client)
        if self.paused_until is not None and now >= self.paused_until:
            self.paused_until = None
            if self.sock is not None:
                self.selector.register(self.sock, selectors.EVENT_READ, self._on_accept)

    def close_clients(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)

    def close(self, unlink: bool = True) -> None:
        """Stop serving; remove the socket file if it is still ours."""
        self.close_clients()
        if self.sock is not None:
            try:
                self.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.sock.close()
            self.sock = None
        self.paused_until = None
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


def query_status(path: str, timeout: float = 5.0) -> Dict[str, Any]:
    """The master's status document.

    :raises OSError: nothing answers at *path*.
    :raises ValueError: the reply is not a status document.
    """
    reply = json.loads(query(path, "status", timeout))
    if not isinstance(reply, dict) or "pid" not in reply:
        raise ValueError(f"unexpected reply from {path}")
    return reply
