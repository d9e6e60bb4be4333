"""The master-side endpoint (preforkd.endpoints) in-process: a real listening socket, a
real selector driven by a loop thread standing in for the master's loop, real clients.

What is shown: one request, one reply, then a lingering close; reply-at-once endpoints;
the request bound; a failing reply function costs one client, not the endpoint; a
silent client is dropped at its deadline; at the client limit a waiting connection
displaces the longest half-open one; out of descriptors at accept, the listener rests
instead of spinning and comes back.
"""

from __future__ import annotations

import resource
import selectors
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from preforkd.addresses import parse_address
from preforkd.endpoints import Endpoint
from preforkd.listeners import Listener, bind


class Events:
    """Stands in for a Logger: records (level, event, fields)."""

    def __init__(self) -> None:
        self.seen: List[Tuple[str, str, Dict[str, Any]]] = []

    def _log(self, level: str, event: str, **kw: Any) -> None:
        self.seen.append((level, event, kw))

    def debug(self, event: str, **kw: Any) -> None:
        self._log("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log("error", event, **kw)

    def names(self) -> List[str]:
        return [e for _, e, _ in self.seen]


class Loop:
    """The master loop in miniature: select, dispatch, tick; in a thread, with a counter
    of how often the listener's callback ran."""

    def __init__(self, endpoint: Endpoint, selector: selectors.BaseSelector) -> None:
        self.endpoint, self.selector = endpoint, selector
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            deadline = self.endpoint.deadline()
            timeout = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
            with self.lock:
                for key, mask in self.selector.select(timeout):
                    key.data(mask)
                self.endpoint.tick(time.monotonic())

    def __enter__(self) -> Loop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture
def serve() -> Iterator[Callable[..., Tuple[Endpoint, Events, Tuple[str, int], Loop]]]:
    made: List[Tuple[Loop, Listener]] = []

    def start(respond: Callable[[bytes], bytes], **kw: Any) -> Tuple[Endpoint, Events, Tuple[str, int], Loop]:
        listener = bind(parse_address("tcp://127.0.0.1:0"), 64)
        selector = selectors.DefaultSelector()
        events = Events()
        endpoint = Endpoint("test", listener, selector, respond, events, **kw)  # type: ignore[arg-type]
        endpoint.start()
        loop = Loop(endpoint, selector).__enter__()
        made.append((loop, listener))
        return endpoint, events, listener.sock.getsockname()[:2], loop

    yield start
    for loop, listener in made:
        loop.__exit__()
        loop.endpoint.close()
        listener.close()


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.01)
    raise AssertionError("timed out")


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def ask(addr: Tuple[str, int], request: bytes) -> bytes:
    with socket.create_connection(addr, timeout=10) as s:
        if request:
            s.sendall(request)
        return read_all(s)


def still_open(sock: socket.socket) -> bool:
    """Not closed by the server: nothing to read yet (a closed one reads as EOF or a reset)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


def test_one_request_one_reply_then_close(serve: Any) -> None:
    endpoint, _, addr, _ = serve(lambda req: b"got " + req, terminators=(b"\r\n\r\n", b"\n\n"))
    assert ask(addr, b"GET / HTTP/1.0\r\n\r\n") == b"got GET / HTTP/1.0\r\n\r\n"
    assert ask(addr, b"hi\n\nextra") == b"got hi\n\n"  # input after the request is read and discarded
    big = b"x" * 200_000  # a reply larger than the socket buffer goes out in pieces
    endpoint.respond = lambda req: big
    assert ask(addr, b"a\n\n") == big
    wait_for(lambda: not endpoint.clients)
    assert endpoint.served == 3


def test_reply_at_once_without_reading(serve: Any) -> None:
    _, _, addr, _ = serve(lambda req: b"up 100%\n", terminators=())
    assert ask(addr, b"") == b"up 100%\n"
    assert ask(addr, b"whatever the balancer sends\n") == b"up 100%\n"


def test_a_request_too_long_gets_the_overflow_reply(serve: Any) -> None:
    _, _, addr, _ = serve(lambda req: b"ok", terminators=(b"\n",), max_request=100, overflow_reply=b"too long")
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(b"y" * 150)
        assert read_all(s) == b"too long"
    assert ask(addr, b"short\n") == b"ok"


def test_a_failing_reply_costs_one_client(serve: Any) -> None:
    calls = []

    def respond(req: bytes) -> bytes:
        calls.append(req)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return b"fine"

    _, events, addr, _ = serve(respond, error_reply=b"error")
    assert ask(addr, b"one\n") == b"error"
    assert ask(addr, b"two\n") == b"fine"
    assert "endpoint.error" in events.names()


def test_a_silent_client_is_dropped_at_its_deadline(serve: Any) -> None:
    endpoint, _, addr, _ = serve(lambda req: b"ok", timeout=0.3)
    with socket.create_connection(addr, timeout=10) as s:
        assert read_all(s) == b""  # closed by the server, not by us
    wait_for(lambda: not endpoint.clients)


def test_at_the_limit_a_waiting_connection_displaces_the_oldest_half_open_one(serve: Any) -> None:
    endpoint, _, addr, _ = serve(lambda req: b"ok", max_clients=4, timeout=60)
    half_open = []
    try:
        for _ in range(6):  # more silent clients than the endpoint holds
            s = socket.create_connection(addr, timeout=10)
            s.sendall(b"partial, no terminator")
            half_open.append(s)
        wait_for(lambda: len(endpoint.clients) == 4 and sum(not still_open(s) for s in half_open) == 2)
        assert not still_open(half_open[0]) and not still_open(half_open[1])  # the oldest went first
        assert ask(addr, b"real\n") == b"ok"  # a real client still gets through
    finally:
        for s in half_open:
            s.close()


def test_at_the_limit_with_every_client_being_answered_it_stops_accepting(serve: Any) -> None:
    big = b"z" * 4_000_000  # far more than the socket buffers: the client must read it
    endpoint, _, addr, _ = serve(lambda req: big, max_clients=2, timeout=60)
    slow = [socket.create_connection(addr, timeout=10) for _ in range(2)]
    try:
        for s in slow:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"go\n")
        wait_for(lambda: endpoint.served == 0 and len(endpoint.clients) == 2
                 and all(c.outbuf for c in endpoint.clients.values()))
        waiting = socket.create_connection(addr, timeout=10)  # queued by the kernel, not accepted
        waiting.sendall(b"me too\n")
        wait_for(lambda: not endpoint.accepting)
        assert len(endpoint.clients) == 2 and still_open(slow[0]) and still_open(slow[1])
        slow[0].close()  # one leaves: the waiting one is accepted and answered
        assert read_all(waiting) == big
        waiting.close()
    finally:
        for s in slow:
            s.close()


def test_out_of_descriptors_the_listener_rests_instead_of_spinning(serve: Any) -> None:
    endpoint, events, addr, loop = serve(lambda req: b"ok")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    client: Optional[socket.socket] = None
    with loop.lock:  # hold the loop while the limit is low: nothing else here may need a descriptor
        client = socket.create_connection(addr, timeout=10)
        client.sendall(b"hello\n")
        probe = socket.socket()
        used = probe.fileno()
        probe.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (used, hard))  # the next descriptor is over the limit
        try:
            for key, mask in endpoint.selector.select(5):
                key.data(mask)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert "endpoint.accept_failed" in events.names()
        assert not endpoint.accepting and endpoint.resume_at is not None
        assert endpoint.listener.sock not in [k.fileobj for k in endpoint.selector.get_map().values()]
    try:
        assert read_all(client) == b"ok"  # after the back-off it accepts again
    finally:
        client.close()
    assert endpoint.accepting
