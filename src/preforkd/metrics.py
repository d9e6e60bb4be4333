"""The Prometheus endpoint (``[metrics] listen``): HTTP/1.x on an
:class:`~preforkd.endpoints.Endpoint`, served by the master from its own loop.

One request per connection (``Connection: close``), no keep-alive, no threads:

* ``GET /metrics`` (or ``HEAD``): the metrics in the format the scraper asks for in
  ``Accept`` (the Prometheus text format 0.0.4 by default, OpenMetrics 1.0 when asked),
  rendered by prometheus-client from what the master knows at that moment
  (:mod:`preforkd.collector`); ``GET /``: a pointer to ``/metrics``;
* anything else: ``404``, ``405`` for another method, ``400`` for what is not HTTP,
  ``431`` for a request head over :data:`MAX_REQUEST` bytes;
* limits (:mod:`preforkd.endpoints`): :data:`CLIENT_TIMEOUT` seconds per client (a
  Prometheus ``scrape_timeout`` is 10 s by default), :data:`MAX_CLIENTS` at once.

prometheus-client is imported on the first scrape, or once the master serves (its
import is a tenth of a second of CPU, kept out of a reload's critical path), never in a
worker's code path.
"""

from __future__ import annotations

import selectors
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

from .endpoints import Endpoint
from .listeners import Listener
from .log import Logger

if TYPE_CHECKING:  # pragma: no cover
    from .master import Master

#: Bytes of request head (request line and headers) at most.
MAX_REQUEST = 8192
#: Seconds a client has from connect to close.
CLIENT_TIMEOUT = 10.0
#: Clients served at once (see Endpoint for what happens past it).
MAX_CLIENTS = 16
#: What ``GET /`` answers.
INDEX = b"preforkd: Prometheus metrics at /metrics\n"

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}

#: What renders the metrics: the scraper's ``Accept`` header -> (body, content type).
Render = Callable[[str], Tuple[bytes, str]]


def response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
             head_only: bool = False, extra: Tuple[Tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 response that closes the connection (RFC 9112: ``Content-Length``
    framing, ``Connection: close``). With *head_only* the body is left out but its
    length is still announced (a ``HEAD`` request, RFC 9110 section 9.3.2)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close", "Cache-Control: no-store"]
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


def parse_request(request: bytes) -> Optional[Tuple[str, str, Dict[str, str]]]:
    """``(method, path, headers)`` of an HTTP/1.x request head (RFC 9112 section 3:
    ``METHOD SP target SP HTTP/x.y``; header names lower-cased; the query string is
    dropped), or ``None`` when it is not one."""
    lines = request.replace(b"\r\n", b"\n").split(b"\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return method, target.split("?", 1)[0], headers


def http_reply(request: bytes, render: Render) -> bytes:
    """The response to one request head (see the module docstring for the routes)."""
    parsed = parse_request(request)
    if parsed is None:
        return response(400, b"not an HTTP/1.x request\n")
    method, path, headers = parsed
    if method not in ("GET", "HEAD"):
        return response(405, b"only GET and HEAD\n", extra=(("Allow", "GET, HEAD"),))
    head_only = method == "HEAD"
    if path == "/metrics":
        body, content_type = render(headers.get("accept", ""))
        return response(200, body, content_type, head_only)
    if path == "/":
        return response(200, INDEX, head_only=head_only)
    return response(404, b"not found; try /metrics\n", head_only=head_only)


class Renderer:
    """Renders the master's metrics on demand; imports prometheus-client (and builds the
    registry, :func:`preforkd.collector.registry`) on first use or :meth:`prepare`."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self._registry: Any = None
        self._choose: Any = None

    @property
    def ready(self) -> bool:
        return self._registry is not None

    def prepare(self) -> None:
        """Import prometheus-client and build the registry now (idempotent)."""
        if self._registry is None:
            from prometheus_client.exposition import choose_encoder

            from .collector import registry

            self._registry = registry(self.master)
            self._choose = choose_encoder

    def __call__(self, accept: str) -> Tuple[bytes, str]:
        """The metrics in the format *accept* asks for: ``(body, content type)``."""
        self.prepare()
        encoder, content_type = self._choose(accept)
        return encoder(self._registry), str(content_type)


def metrics_endpoint(listener: Listener, selector: selectors.BaseSelector, logger: Logger,
                     renderer: Render) -> Endpoint:
    """The ``[metrics]`` endpoint on *listener*, answering with *renderer*."""
    return Endpoint("metrics", listener, selector, lambda request: http_reply(request, renderer), logger,
                    terminators=(b"\r\n\r\n", b"\n\n"), max_request=MAX_REQUEST, timeout=CLIENT_TIMEOUT,
                    max_clients=MAX_CLIENTS, overflow_reply=response(431, b"request head too large\n"),
                    error_reply=response(500, b"internal error; see the master's log\n"))
