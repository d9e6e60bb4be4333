"""The PROXY protocol parser and reader (preforkd.proxyproto), in-process.

Cases from HAProxy's doc/proxy-protocol.txt (sections 2.1 and 2.2), then properties
checked with hypothesis: any bytes give a header, "need more" or ProxyError and
nothing else; a need-more answer never comes past the header's bound; headers built
from random addresses, ports and TLVs parse back to what was put in, whatever
follows them and however they are cut; the socket reader never takes a byte past the
header.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time
from typing import List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preforkd.log import EventLog
from preforkd.proxyproto import (
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    ProxyError,
    ProxyGate,
    ProxyHeader,
    parse,
    read_header,
)


def v2(command: int = 1, fam: int = 0x11, addresses: bytes = b"", tlvs: bytes = b"", version: int = 2,
       length: Optional[int] = None) -> bytes:
    body = addresses + tlvs
    n = len(body) if length is None else length
    return V2_SIGNATURE + bytes([(version << 4) | command, fam]) + struct.pack("!H", n) + body


def v2_inet(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fam = 0x11 if a.version == 4 else 0x21
    return v2(fam=fam, addresses=a.packed + b.packed + struct.pack("!HH", sport, dport), tlvs=tlvs)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# -- version 1 ------------------------------------------------------------------------


@pytest.mark.parametrize("line, family, source, dest", [
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", "TCP4", ("0.0.0.0", 0), ("255.255.255.255", 65535)),
    (b"PROXY TCP6 2001:DB8::1 ::1 1 2\r\n", "TCP6", ("2001:db8::1", 1), ("::1", 2)),
    (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
     "TCP6", ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)),
    (b"PROXY UNKNOWN\r\n", "UNKNOWN", None, None),
    (b"PROXY UNKNOWN anything at all, ignored\r\n", "UNKNOWN", None, None),
])
def test_v1_valid(line: bytes, family: str, source: object, dest: object) -> None:
    h = parse(line + b"PING\r\n")
    assert h == ProxyHeader(1, "proxy", family, source, dest, len(line))


@pytest.mark.parametrize("line, why", [
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n", "CRLF"),               # a lone LF
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\rX\r\n", "CRLF"),          # a lone CR
    (b"PROXY TCP4 192.168.000.1 192.168.0.11 56324 443\r\n", "address"),        # leading zeros
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n", "port"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 +1 443\r\n", "port"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n", "port"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 1 \r\n", "port"),
    (b"PROXY TCP4 192.168.0.1  192.168.0.11 1 2\r\n", "exactly two"),           # two spaces
    (b"PROXY TCP4 ::1 ::1 1 2\r\n", "TCP4 address"),                              # wrong family
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "TCP6 address"),
    (b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n", "TCP6 address"),                 # embedded IPv4
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "TCP6 address"),                    # zone
    (b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n", "unknown protocol"),
    (b"PROXY\r\n", "PROXY "),
    (b"PROXYTCP4 1.2.3.4 1.2.3.4 1 2\r\n", "PROXY "),
    (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "no PROXY"),
    (b"GET / HTTP/1.0\r\n", "no PROXY"),
    (b"PING\r\n", "no PROXY"),
    (b"PROXY UNKNOWN " + b"f" * 100 + b"\r\n", "CRLF in its first 107"),        # 116 bytes
])
def test_v1_invalid(line: bytes, why: str) -> None:
    with pytest.raises(ProxyError, match=why):
        parse(line)


def test_v1_longest_line_is_107_bytes() -> None:
    line = b"PROXY UNKNOWN " + b"f" * (V1_MAX - 16) + b"\r\n"
    assert len(line) == V1_MAX and parse(line) is not None
    with pytest.raises(ProxyError):
        parse(line[:-2] + b"f\r\n")


# -- version 2 ------------------------------------------------------------------------


def test_v2_tcp4_tcp6_unix() -> None:
    h = parse(v2_inet("10.1.2.3", "10.0.0.1", 40000, 443) + b"PING\r\n")
    assert h == ProxyHeader(2, "proxy", "TCP4", ("10.1.2.3", 40000), ("10.0.0.1", 443), 28)
    h = parse(v2_inet("2001:db8::7", "::1", 1, 65535))
    assert h == ProxyHeader(2, "proxy", "TCP6", ("2001:db8::7", 1), ("::1", 65535), 52)
    addresses = b"/run/client.sock".ljust(108, b"\x00") + b"/run/server.sock".ljust(108, b"\x00")
    h = parse(v2(fam=0x31, addresses=addresses))
    assert h == ProxyHeader(2, "proxy", "UNIX", "/run/client.sock", "/run/server.sock", 232)


def test_v2_local_is_valid_and_skips_its_block() -> None:
    """LOCAL (a health check): valid; the family is ignored and the block, whatever it
    holds, skipped (section 2.2: never assume the length is zero)."""
    assert parse(v2(command=0, fam=0x00)) == ProxyHeader(2, "local", "UNKNOWN", None, None, 16)
    assert parse(v2(command=0, fam=0x11, addresses=b"x" * 5)) == ProxyHeader(2, "local", "UNKNOWN", None, None, 21)


@pytest.mark.parametrize("fam", [0x00, 0x10, 0x12, 0x22, 0x32, 0x01])
def test_v2_unspecified_or_datagram_falls_back_to_the_real_endpoints(fam: int) -> None:
    size = {0: 0, 1: 12, 2: 36, 3: 216}[fam >> 4]
    h = parse(v2(fam=fam, addresses=b"\x01" * size))
    assert h is not None and h.family == "UNKNOWN" and h.source is None and h.command == "proxy"


def test_v2_tlvs_are_skipped() -> None:
    tlvs = tlv(0x01, b"h2") + tlv(0x02, b"example.com") + tlv(0x04, b"") + tlv(0x20, b"\x01" + b"\0" * 4)
    data = v2_inet("1.2.3.4", "5.6.7.8", 1, 2, tlvs=tlvs)
    h = parse(data + b"rest")
    assert h is not None and h.source == ("1.2.3.4", 1) and h.length == len(data)


@pytest.mark.parametrize("data, why", [
    (v2(version=1), "version 1"),
    (v2(version=3), "version 3"),
    (v2(command=2), "command"),
    (v2(command=0xF), "command"),
    (v2(fam=0x41, addresses=b"x" * 12), "family"),
    (v2(fam=0x13, addresses=b"x" * 12), "family"),
    (v2(fam=0x11, addresses=b"x" * 11), "too short"),
    (v2(fam=0x21, addresses=b"x" * 12), "too short"),
    (v2(fam=0x31, addresses=b"x" * 108), "too short"),
    (v2_inet("1.2.3.4", "1.2.3.4", 1, 2, tlvs=b"\x01\x00"), "truncated TLV"),
    (v2_inet("1.2.3.4", "1.2.3.4", 1, 2, tlvs=tlv(1, b"ab")[:-1]), "longer than the header"),
    (b"\r\n\r\n\x00\r\nQUIT\r" + b"\x21\x11\x00\x0c" + b"x" * 12, "no PROXY"),
    (b"\r\n\r\n\r\n", "no PROXY"),
])
def test_v2_invalid(data: bytes, why: str) -> None:
    with pytest.raises(ProxyError, match=why):
        parse(data)


def test_v2_bound_is_the_16_bit_length() -> None:
    header = v2(command=0, fam=0, addresses=b"\0" * 0xFFFF)
    assert len(header) == V2_MAX and parse(header) == ProxyHeader(2, "local", "UNKNOWN", None, None, V2_MAX)
    assert parse(header[:-1]) is None


# -- properties -----------------------------------------------------------------------


def _outcome(data: bytes) -> Tuple[str, Optional[ProxyHeader]]:
    try:
        h = parse(data)
    except ProxyError:
        return "error", None
    return ("more", None) if h is None else ("header", h)


@given(st.binary(max_size=300))
@settings(max_examples=600)
def test_any_bytes_give_a_header_need_more_or_proxy_error(data: bytes) -> None:
    kind, h = _outcome(data)
    if kind == "more":
        assert len(data) < V2_MAX
        if data[:1] == b"P":
            assert len(data) < V1_MAX
    if h is not None:
        assert 0 < h.length <= len(data)


@given(st.sampled_from([b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN ", V2_SIGNATURE + b"\x21\x11", V2_SIGNATURE]),
       st.binary(max_size=200))
@settings(max_examples=600)
def test_plausible_beginnings_never_crash(prefix: bytes, tail: bytes) -> None:
    _outcome(prefix + tail)


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5)


@st.composite
def headers(draw: st.DrawFn) -> Tuple[bytes, Tuple[str, int], Tuple[str, int]]:
    six = draw(st.booleans())
    src, dst = (draw(ipv6), draw(ipv6)) if six else (draw(ipv4), draw(ipv4))
    sport, dport = draw(ports), draw(ports)
    if draw(st.booleans()):
        data = f"PROXY {'TCP6' if six else 'TCP4'} {src} {dst} {sport} {dport}\r\n".encode()
    else:
        data = v2_inet(src, dst, sport, dport, tlvs=b"".join(tlv(k, v) for k, v in draw(tlv_lists)))
    return data, (_canonical(src), sport), (_canonical(dst), dport)


def _canonical(addr: str) -> str:
    """The address as accept() would write it (inet_ntop)."""
    af = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return socket.inet_ntop(af, socket.inet_pton(af, addr))


@given(headers(), st.binary(max_size=64), st.data())
@settings(max_examples=400)
def test_built_headers_parse_back_whatever_follows_and_wherever_cut(
        built: Tuple[bytes, Tuple[str, int], Tuple[str, int]], after: bytes, data: st.DataObject) -> None:
    header, src, dst = built
    h = parse(header + after)
    assert h is not None and (h.source, h.dest, h.length) == (src, dst, len(header))
    cut = data.draw(st.integers(0, len(header) - 1))
    assert parse(header[:cut]) is None


# -- the socket reader ----------------------------------------------------------------


def _pair() -> Tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    b.settimeout(None)
    return a, b


@given(headers(), st.binary(min_size=1, max_size=64), st.lists(st.integers(1, 40), max_size=4))
@settings(max_examples=60, deadline=None)
def test_read_header_takes_exactly_the_header(built: Tuple[bytes, Tuple[str, int], Tuple[str, int]],
                                              after: bytes, cuts: List[int]) -> None:
    """However the header is cut into segments, the reader returns it and leaves every
    byte after it in the socket."""
    header, src, _ = built
    wire = header + after
    chunks, pos = [], 0
    for c in cuts:
        chunks.append(wire[pos:pos + c])
        pos += c
    chunks.append(wire[pos:])
    a, b = _pair()
    with a, b:
        def send() -> None:
            for chunk in chunks:
                if chunk:
                    a.sendall(chunk)
                    time.sleep(0.002)  # separate segments for the reader (not a synchronisation)
        t = threading.Thread(target=send)
        t.start()
        h = read_header(b, timeout=5.0)
        t.join()
        assert h.source == src
        a.shutdown(socket.SHUT_WR)
        rest = b""
        while True:
            got = b.recv(4096)
            if not got:
                break
            rest += got
        assert rest == after


def test_read_header_times_out() -> None:
    a, b = _pair()
    with a, b:
        a.sendall(b"PROXY TCP4 1.2.3.4")
        with pytest.raises(ProxyError, match=r"within 0\.2 s"):
            read_header(b, timeout=0.2)


@pytest.mark.parametrize("wire, why", [
    (b"", "without a header"),
    (b"PROXY TCP4 1.2", "before a complete header"),
    (b"HELLO\r\n", "no PROXY"),
])
def test_read_header_rejects_at_end_of_input(wire: bytes, why: str) -> None:
    a, b = _pair()
    with a, b:
        a.sendall(wire)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ProxyError, match=why):
            read_header(b, timeout=5.0)


def test_gate_trusts_networks_and_unix_peers() -> None:
    gate = ProxyGate(("127.0.0.0/8", "::1/128", "10.0.0.0/8"), 1.0, EventLog(fmt="json").logger())
    assert gate.trusts(("127.0.0.5", 1)) and gate.trusts(("10.9.9.9", 1)) and gate.trusts(("::1", 1, 0, 0))
    assert gate.trusts(("::ffff:10.1.1.1", 1, 0, 0))
    assert not gate.trusts(("192.0.2.1", 1)) and not gate.trusts(("2001:db8::1", 1, 0, 0))
    assert gate.trusts("")  # a Unix socket peer
    assert not gate.trusts(("192.0.2.1", 2))  # cached answer, same result
