"""Fast in-process tests of the pure parts: no supervisor process, no sleeping.

Address parsing, framing and reply encoding, the scoreboard, back-off, listener
matching and keys, the hand-over across exec, the signal table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preforkd import Close
from preforkd.addresses import AddressError, parse_address
from preforkd.config import build_config
from preforkd.listeners import address_matches, bind, listener_specs
from preforkd.pool import BACKOFF_MAX, backoff_delay
from preforkd.protocol import Connection, LineTooLong, encode_reply, serve_line_function
from preforkd.reexec import Count, Handover, HandoverError, InheritedListener, InheritedWorker
from preforkd.scoreboard import SERVED, SLOTS, STATE, Scoreboard, ScoreboardFull, State
from preforkd.signals import BLOCKED_ACROSS_EXEC, MASTER_SIGNALS, WORKER_RESET, describe_status

# -- addresses ------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("tcp://127.0.0.1:7000", "tcp://127.0.0.1:7000"),
    ("tcp://*:80", "tcp://0.0.0.0:80"),
    ("tcp://[::1]:0", "tcp://[::1]:0"),
    ("tcp://[0:0:0:0:0:0:0:1]:9", "tcp://[::1]:9"),
    ("tcp://localhost:7000", "tcp://localhost:7000"),
    ("unix:/run/x.sock", "unix:/run/x.sock"),
    ("unix:///run/x.sock", "unix:/run/x.sock"),
])
def test_parse_address_accepts(text: str, expected: str) -> None:
    assert str(parse_address(text, "/base")) == expected


def test_parse_address_resolves_relative_unix_paths() -> None:
    assert parse_address("unix:run/x.sock", "/etc/preforkd").path == "/etc/preforkd/run/x.sock"


@pytest.mark.parametrize("text, why", [
    ("127.0.0.1:7000", "tcp:// or unix:"),
    ("tcp://127.0.0.1", "tcp://HOST:PORT"),
    ("tcp://127.0.0.1:65536", "0 to 65535"),
    ("tcp://127.0.0.1:-1", "0 to 65535"),
    ("tcp://::1:7000", "brackets"),
    ("tcp://[::1:7000", "tcp://[IPV6]:PORT"),
    ("tcp://[fe80::zz]:1", "not an IPv6 address"),
    ("tcp://300.1.1.1:1", "not an IPv4 address"),
    ("tcp://ex ample:1", "host name"),
    ("unix:", "needs a path"),
    ("unix:/" + "x" * 200, "107 bytes"),
])
def test_parse_address_rejects_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(AddressError, match=why.replace("[", r"\[").replace("+", r"\+")):
        parse_address(text)


@given(st.integers(0, 65535), st.ip_addresses(v=4))
def test_tcp_address_round_trips(port: int, ip: object) -> None:
    addr = parse_address(f"tcp://{ip}:{port}")
    assert parse_address(str(addr)) == addr and addr.port == port


@given(st.text(max_size=40))
def test_parse_address_never_fails_otherwise(text: str) -> None:
    try:
        parse_address(text, "/base")
    except AddressError as exc:
        assert "\n" not in str(exc).strip("\n") or "\n" in text  # one line (unless the input had one)


# -- reply encoding and framing ------------------------------------------------------


@pytest.mark.parametrize("reply, wire, close", [
    (None, b"", False),
    ("hi", b"hi\r\n", False),
    (["a", "b"], b"a\r\nb\r\n", False),
    (("a",), b"a\r\n", False),
    (Close("bye"), b"bye\r\n", True),
    (Close(), b"", True),
    (Close(["x", "y"]), b"x\r\ny\r\n", True),
    ("é", "é\r\n".encode(), False),
])
def test_encode_reply(reply: object, wire: bytes, close: bool) -> None:
    assert encode_reply(reply) == (wire, close)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad, error", [("a\nb", ValueError), ("a\r", ValueError), (3, TypeError),
                                        (["ok", 3], TypeError), (b"bytes", TypeError)])
def test_encode_reply_refuses(bad: object, error: type) -> None:
    with pytest.raises(error):
        encode_reply(bad)  # type: ignore[arg-type]


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def test_readline_lenient_in() -> None:
    server, client = _pair()
    client.sendall(b"one\r\ntwo\nthree")
    client.shutdown(socket.SHUT_WR)
    conn = Connection(server, None, "t", 100, 5)
    assert [conn.readline(), conn.readline(), conn.readline(), conn.readline()] == ["one", "two", "three", None]
    server.close()
    client.close()


def test_readline_bounds_a_long_line() -> None:
    server, client = _pair()
    client.sendall(b"x" * 200)
    conn = Connection(server, None, "t", 100, 5)
    with pytest.raises(LineTooLong):
        conn.readline()
    server.close()
    client.close()


def _serve_echo(payload: bytes, limit: int = 100) -> bytes:
    server, client = _pair()
    out = []
    reader = threading.Thread(target=lambda: out.append(_read_all(client)))
    reader.start()
    client.sendall(payload)
    client.shutdown(socket.SHUT_WR)
    try:
        serve_line_function(Connection(server, None, "t", limit, 5), lambda line: line)
    finally:
        server.close()
    reader.join(5)
    client.close()
    return out[0]


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def test_serve_line_function_frames_strictly_out() -> None:
    assert _serve_echo(b"a\r\nb\nc") == b"a\r\nb\r\nc\r\n"


@settings(deadline=None)  # real sockets and a thread: a loaded machine may take its time
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                        max_size=30), max_size=20))
def test_serve_line_function_echoes_any_lines(lines: list[str]) -> None:
    payload = "".join(line + "\n" for line in lines).encode()
    assert _serve_echo(payload, limit=1000) == "".join(line + "\r\n" for line in lines).encode()


# -- scoreboard ------------------------------------------------------------------------


def test_scoreboard_slots_are_zeroed_and_isolated() -> None:
    board = Scoreboard()
    a, b = board.claim(), board.claim()
    cells = board.cells(a)
    cells[STATE] = State.BUSY
    cells[SERVED] = 7
    assert (board.state(a), board.served(a)) == ("busy", 7)
    assert (board.state(b), board.served(b)) == ("starting", 0)
    board.release(a)
    again = board.claim()
    assert again == a and board.state(again) == "starting" and board.served(again) == 0


def test_scoreboard_survives_as_the_same_memory_through_its_fd() -> None:
    board = Scoreboard()
    slot = board.claim()
    board.cells(slot)[SERVED] = 42
    other = Scoreboard(os.dup(board.fd))
    assert other.claim(slot) == slot and other.served(slot) == 42


def test_scoreboard_full() -> None:
    board = Scoreboard()
    for _ in range(SLOTS):
        board.claim()
    with pytest.raises(ScoreboardFull):
        board.claim()


# -- back-off ------------------------------------------------------------------------------


def test_backoff_doubles_to_a_ceiling() -> None:
    assert [backoff_delay(n) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert backoff_delay(100) == BACKOFF_MAX == backoff_delay(10**6)


# -- listeners -------------------------------------------------------------------------


def _config(services: list[dict[str, object]]) -> object:
    return build_config({"service": services}, "t.toml", "/tmp", "/tmp/t.toml")


def test_listener_keys_name_ephemeral_ports_by_service_and_place() -> None:
    config = _config([{"name": "a", "listen": ["tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "tcp://127.0.0.1:7000"]},
                      {"name": "b", "listen": ["tcp://127.0.0.1:0", "unix:/tmp/x.sock"]}])
    keys = [spec.key for spec in listener_specs(config)]  # type: ignore[arg-type]
    assert keys == ["tcp://127.0.0.1:0@a#0", "tcp://127.0.0.1:0@a#1", "tcp://127.0.0.1:7000",
                    "tcp://127.0.0.1:0@b#0", "unix:/tmp/x.sock"]


def test_address_matches_by_bound_address(tmp_path: object) -> None:
    lst = bind(parse_address("tcp://127.0.0.1:0"), 16)
    try:
        port = lst.sock.getsockname()[1]
        assert address_matches(parse_address("tcp://127.0.0.1:0"), lst.sock)
        assert address_matches(parse_address(f"tcp://127.0.0.1:{port}"), lst.sock)
        assert address_matches(parse_address(f"tcp://localhost:{port}"), lst.sock)
        assert not address_matches(parse_address(f"tcp://127.0.0.2:{port}"), lst.sock)
        assert not address_matches(parse_address(f"tcp://127.0.0.1:{port ^ 1}"), lst.sock)
        assert not address_matches(parse_address("unix:/tmp/nothing.sock"), lst.sock)
    finally:
        lst.close()


# -- the hand-over across exec --------------------------------------------------------------


def _handover() -> Handover:
    return Handover(
        generation=3, started_wall=1.7e9, hup_monotonic=123.5, reload_seq=2, pending_reload=True,
        listeners=(InheritedListener(fd=5, key="tcp://127.0.0.1:0@echo#0", address="tcp://127.0.0.1:0",
                                     origin="bound", file_id=None),
                   InheritedListener(fd=6, key="unix:/x", address="unix:/x", origin="activated", file_id=(1, 2))),
        workers=(InheritedWorker(pid=10, service="echo", number=1, generation=3, slot=0, ready=True, stopping=False,
                                 started_wall=1.7e9),),
        scoreboard_fd=4, alive_r=7, alive_w=8, pidfile_fd=None, pidfile_path="", control_fd=9,
        control_path="/run/c.sock", control_file_id=(3, 4),
        counters=(Count(name="retired", labels=("echo", "connections"), value=12),
                  Count(name="reloads", labels=("ok",), value=2)))


def test_handover_round_trips() -> None:
    h = _handover()
    assert Handover.decode(h.encode()) == h
    assert sorted(h.fds()) == [4, 5, 6, 7, 8, 9]


def _mangle(change: dict[str, object], drop: str = "") -> str:
    data = json.loads(_handover().encode())
    data.update(change)
    data.pop(drop, None)
    return json.dumps(data)


@pytest.mark.parametrize("text, why", [
    (_mangle({"version": 1}), "version 1"),
    (_mangle({}, drop="alive_w"), "missing field 'alive_w'"),
    (_mangle({"alive_wr": 3}), "unknown field 'alive_wr'"),
    (_mangle({"generation": "3"}), r"\.generation: expected int"),
    (_mangle({"pending_reload": 1}), r"\.pending_reload: expected bool"),
    (_mangle({"listeners": [{"fd": 5}]}), r"\.listeners\[0\]: missing field"),
    (_mangle({"control_file_id": [1]}), r"\.control_file_id: expected an array"),
    (_mangle({"counters": [{"name": "reloads", "labels": ["ok"], "value": "2"}]}),
     r"\.counters\[0\]\.value: expected int"),
    ("{not json", "not JSON"),
])
def test_handover_decode_names_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(HandoverError, match=why):
        Handover.decode(text)


def test_handover_fields_are_all_documented() -> None:
    doc = (Path(__file__).parent.parent.parent / "docs" / "reload.md").read_text()
    for cls in (Handover, InheritedListener, InheritedWorker, Count):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in doc, f"docs/reload.md does not describe {cls.__name__}.{f.name}"


# -- signals ---------------------------------------------------------------------------------


def test_signal_lists_derive_from_the_table() -> None:
    assert set(BLOCKED_ACROSS_EXEC) == set(MASTER_SIGNALS)
    assert set(MASTER_SIGNALS) <= set(WORKER_RESET)
    assert set(MASTER_SIGNALS.values()) == {"hup", "term", "int", "quit", "chld", "ttin", "ttou", "usr1"}


def test_describe_status() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    assert describe_status(status) == {"exit_code": 7}
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert describe_status(status) == {"signal": "SIGKILL"}


# -- dynamic pools ---------------------------------------------------------------------


class _Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, object]]] = []

    def info(self, event: str, **kw: object) -> None:
        self.seen.append((event, kw))

    warning = info


def _dynamic_pool(target: int, **keys: object) -> object:
    from preforkd.pool import Pool

    config = build_config({"service": [{"name": "a", "listen": ["tcp://127.0.0.1:0"], "workers": 4,
                                         "max_workers": 64, **keys}]}, "t.toml", "/tmp", "/tmp/t.toml")
    return Pool(config=config.services[0], listeners=[], handler=None, floor=4, target=target)


def test_waiting_connections_are_for_idle_workers_first() -> None:
    """A connection or two in the accept queue of a pool with idle workers is theirs to
    take: no growth (it used to add one worker per waiting connection)."""
    from preforkd.pool import Census

    pool = _dynamic_pool(48)
    events = _Events()
    pool.adjust(Census(idle=47, busy=1), queued=3, now=0.0, logger=events)  # type: ignore[attr-defined]
    assert pool.target == 48 and not events.seen  # type: ignore[attr-defined]
    pool.adjust(Census(idle=0, busy=48), queued=3, now=0.0, logger=events)  # type: ignore[attr-defined]
    assert pool.target == 48 + 3  # type: ignore[attr-defined]


def test_a_dynamic_pool_grows_for_spares_and_is_bounded() -> None:
    from preforkd.pool import MAX_SPAWN_BATCH, Census

    pool = _dynamic_pool(4, min_spare_workers=2)
    pool.adjust(Census(idle=0, busy=4), queued=0, now=0.0, logger=_Events())  # type: ignore[attr-defined]
    assert pool.target == 6  # type: ignore[attr-defined]
    pool = _dynamic_pool(4)
    pool.adjust(Census(idle=0, busy=4), queued=1000, now=0.0, logger=_Events())  # type: ignore[attr-defined]
    assert pool.target == 4 + MAX_SPAWN_BATCH  # type: ignore[attr-defined]
    pool = _dynamic_pool(64)
    events = _Events()
    pool.adjust(Census(idle=0, busy=64), queued=5, now=0.0, logger=events)  # type: ignore[attr-defined]
    pool.adjust(Census(idle=0, busy=64), queued=9, now=1.0, logger=events)  # type: ignore[attr-defined]
    assert pool.target == 64 and [e for e, _ in events.seen] == ["pool.saturated"]  # type: ignore[attr-defined]
