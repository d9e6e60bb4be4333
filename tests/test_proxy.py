"""PROXY protocol v1 and v2 on real sockets (``proxy_protocol``, ``proxy_trusted``).

Each test runs with one-connection workers and with event-driven workers on asyncio
and on uvloop: the client address in the header is what handlers see, what events
log and what ``command`` programs get; LOCAL keeps the real addresses; a missing,
malformed, late or untrusted header is dropped and logged as ``proxy.rejected``.
The headers are built here byte by byte from HAProxy's doc/proxy-protocol.txt.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import textwrap

import pytest

from conftest import connect, recv_all, recv_until, run_cli, write_config

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fam = 0x11 if a.version == 4 else 0x21
    body = a.packed + b.packed + struct.pack("!HH", sport, dport) + tlvs
    return V2_SIG + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


V2_LOCAL = V2_SIG + b"\x20\x00\x00\x00"

PEER_MODULE = '''
from preforkd import LineHandler


class Peer(LineHandler):
    """Greets, then answers every line with the peer it sees."""

    def on_connect(self):
        return "hello " + self.conn.peer

    def on_line(self, line):
        return f"{line} from {self.conn.peer}"
'''


@pytest.fixture(params=["sync", "asyncio", "uvloop"])
def kind(request):
    return request.param


def config(tmp_path, kind: str, extra: str = "", handler: str = "peerinfo:Peer") -> str:
    (tmp_path / "peerinfo.py").write_text(PEER_MODULE)
    conns = "worker_connections = 8\n" if kind != "sync" else ""
    loop = f'event_loop = "{kind}"\n' if kind != "sync" else ""
    return textwrap.dedent(f'''
        [supervisor]
        pidfile = "run/preforkd.pid"
        control_socket = "run/preforkd.sock"
        graceful_timeout = 10
        python_path = ["."]
        {loop}
        [[service]]
        name = "peer"
        listen = ["tcp://127.0.0.1:0"]
        handler = "{handler}"
        workers = 2
        proxy_protocol = true
        idle_timeout = 1
        max_line_length = 64
        {conns}{extra}
    ''')


def hostport(addr) -> str:
    return f"{addr[0]}:{addr[1]}"


def dropped(s: socket.socket) -> bool:
    """The server closed without a byte of reply: end of file, or a reset (a rejected
    connection is aborted, proxy-protocol.txt section 2.1: "abort the connection")."""
    try:
        return recv_all(s) == b""
    except ConnectionResetError:
        return True


def talk(addr, header: bytes, line: bytes, lines: int = 2) -> bytes:
    with connect(addr) as s:
        s.sendall(header + line)  # header and first line in one segment, as HAProxy may
        data = b""
        while data.count(b"\r\n") < lines:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def test_handlers_and_events_see_the_header_address_v1_v2_local(supervisor, tmp_path, kind):
    sv = supervisor(config(tmp_path, kind))
    addr = sv.tcp("peer")
    # v1 TCP4; the greeting waits for the header and names the client from it
    assert talk(addr, b"PROXY TCP4 203.0.113.9 192.0.2.1 40001 443\r\n", b"one\n") == \
        b"hello 203.0.113.9:40001\r\none from 203.0.113.9:40001\r\n"
    # v1 TCP6, header split over two segments
    with connect(addr) as s:
        s.sendall(b"PROXY TCP6 2001:db8::7 2001:db8::1 ")
        s.sendall(b"5 443\r\ntwo\n")
        assert recv_until(s, b"two from [2001:db8::7]:5\r\n").endswith(b"two from [2001:db8::7]:5\r\n")
    # v2 TCP4 with TLVs (ALPN, authority, NOOP), skipped
    tlvs = b"\x01\x00\x02h2" + b"\x02\x00\x0bexample.com" + b"\x04\x00\x00"
    assert talk(addr, v2("198.51.100.20", "192.0.2.1", 65535, 80, tlvs), b"three\n") == \
        b"hello 198.51.100.20:65535\r\nthree from 198.51.100.20:65535\r\n"
    # v2 TCP6
    assert talk(addr, v2("2001:db8::42", "::1", 7, 8), b"four\n").endswith(b"four from [2001:db8::42]:7\r\n")
    # LOCAL (HAProxy's health checks): accepted, the real addresses stand, nothing rejected
    with connect(addr) as s:
        s.sendall(V2_LOCAL + b"five\n")
        real = hostport(s.getsockname())
        assert recv_until(s, b"five from").startswith(f"hello {real}\r\n".encode())
    # v1 UNKNOWN: the same
    with connect(addr) as s:
        s.sendall(b"PROXY UNKNOWN\r\nsix\n")
        real = hostport(s.getsockname())
        assert recv_until(s, b"six from " + real.encode() + b"\r\n").endswith(b"\r\n")
    # events name the client from the header too
    with connect(addr) as s:
        s.sendall(b"PROXY TCP4 203.0.113.77 192.0.2.1 1234 443\r\n" + b"x" * 200 + b"\n")
        recv_all(s)
    sv.wait_event("connection.line_too_long", peer="203.0.113.77:1234")
    assert not sv.log.find("proxy.rejected")


def test_no_header_bad_header_late_header_are_rejected_and_logged(supervisor, tmp_path, kind):
    sv = supervisor(config(tmp_path, kind))
    addr = sv.tcp("peer")
    # no header: dropped before the handler runs (no greeting), logged with the real peer
    with connect(addr) as s:
        s.sendall(b"hello\r\n")
        me = hostport(s.getsockname())
        assert dropped(s)
    ev = sv.wait_event("proxy.rejected", peer=me)
    assert ev["reason"] == "no PROXY protocol header" and ev["level"] == "warning"
    # malformed: leading zeros in a v1 port
    with connect(addr) as s:
        s.sendall(b"PROXY TCP4 1.2.3.4 5.6.7.8 0080 443\r\nline\n")
        me = hostport(s.getsockname())
        assert dropped(s)
    assert "bad port" in sv.wait_event("proxy.rejected", peer=me)["reason"]
    # v2 with an unassigned command
    with connect(addr) as s:
        s.sendall(V2_SIG + b"\x22\x11\x00\x0c" + b"\0" * 12)
        me = hostport(s.getsockname())
        assert dropped(s)
    assert "command" in sv.wait_event("proxy.rejected", peer=me)["reason"]
    # half a header, then silence: dropped after the header timeout (idle_timeout = 1 s here)
    with connect(addr) as s:
        s.sendall(b"PROXY TCP4 1.2.3.4")
        me = hostport(s.getsockname())
        assert dropped(s)
    assert sv.wait_event("proxy.rejected", peer=me)["reason"] == "no complete header within 1 s"
    # closed mid-header
    with connect(addr) as s:
        s.sendall(V2_SIG[:7])
        me = hostport(s.getsockname())
        s.shutdown(socket.SHUT_WR)
        assert dropped(s)
    assert "closed" in sv.wait_event("proxy.rejected", peer=me)["reason"]
    # the service still serves
    out = talk(addr, b"PROXY TCP4 203.0.113.9 192.0.2.1 40001 443\r\n", b"ok\n")
    assert out.endswith(b"ok from 203.0.113.9:40001\r\n")


def test_untrusted_peer_is_rejected_even_with_a_valid_header(supervisor, tmp_path, kind):
    sv = supervisor(config(tmp_path, kind, extra='proxy_trusted = ["10.0.0.0/8", "2001:db8::/32"]'))
    addr = sv.tcp("peer")
    with connect(addr) as s:
        s.sendall(b"PROXY TCP4 203.0.113.9 192.0.2.1 40001 443\r\nline\n")
        me = hostport(s.getsockname())
        assert dropped(s)
    ev = sv.wait_event("proxy.rejected", peer=me)
    assert ev["reason"] == "peer not in proxy_trusted"


def test_command_service_gets_the_header_addresses_and_every_byte_after_it(supervisor, tmp_path):
    """UCSPI variables from the header (TCPLOCALIP/PORT from its destination), and the
    program reads the line that came in the same segment as the header: the worker took
    exactly the header's bytes."""
    script = tmp_path / "who.sh"
    script.write_text('#!/bin/sh\necho "$PROTO $TCPREMOTEIP $TCPREMOTEPORT $TCPLOCALIP $TCPLOCALPORT"\n'
                      'read line\necho "read $line"\n')
    script.chmod(0o755)
    sv = supervisor(f'''
        [[service]]
        name = "who"
        listen = ["tcp://127.0.0.1:0"]
        command = ["{script}"]
        workers = 1
        proxy_protocol = true
    ''')
    addr = sv.tcp("who")
    out = talk(addr, v2("2001:db8::9", "2001:db8::1", 5555, 443), b"after-the-header\n")
    assert out.splitlines() == [b"TCP 2001:db8::9 5555 2001:db8::1 443", b"read after-the-header"]
    # LOCAL: the socket's own addresses
    with connect(addr) as s:
        s.sendall(V2_LOCAL + b"x\n")
        me, srv = s.getsockname(), s.getpeername()
        first = recv_until(s, b"\n").splitlines()[0]
    assert first == f"TCP {me[0]} {me[1]} {srv[0]} {srv[1]}".encode()


def test_config_checks_proxy_keys(tmp_path):
    for body, message in [
        ('proxy_trusted = ["10.0.0.1/8"]', "service[0].proxy_trusted[0]: not a network: 10.0.0.1/8 has host bits set"),
        ('proxy_trusted = "10.0.0.0/8"', "service[0].proxy_trusted: must be an array"),
        ('proxy_protocol = "yes"', "service[0].proxy_protocol: must be true or false"),
    ]:
        cfg = write_config(tmp_path, f'''
            [[service]]
            name = "echo"
            listen = ["tcp://127.0.0.1:0"]
            {body}
        ''')
        res = run_cli("check", "-c", str(cfg))
        assert res.returncode == 1 and message in res.stderr, res.stderr
