"""Listen addresses: ``tcp://HOST:PORT`` and ``unix:PATH``.

``HOST`` is an IPv4 address, a bracketed IPv6 address (``tcp://[::1]:7000``), a host
name (resolved when bound; the first address wins) or ``*`` for all IPv4
interfaces. ``PORT`` 0 asks the kernel for an ephemeral port. ``PATH`` is a file
system path, relative to the configuration file's directory.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Optional, Tuple


class AddressError(ValueError):
    """A listen address that cannot be parsed; the message says why in one line."""


@dataclass(frozen=True)
class Address:
    """A parsed listen address. ``kind`` is ``"tcp"`` or ``"unix"``."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    def identity(self) -> Optional[Tuple[str, str, int]]:
        """A key under which two configured addresses collide, or ``None`` for an
        ephemeral port (two ``:0`` listeners never collide)."""
        if self.kind == "unix":
            return ("unix", self.path, 0)
        if self.port == 0:
            return None
        return ("tcp", self.host, self.port)

    def overlaps(self, other: Address) -> bool:
        """Whether binding both would fail with "address in use": the same Unix path, or
        TCP on the same non-zero port in the same family where the addresses are equal or
        either is the wildcard (``0.0.0.0``, ``::``). Host names are resolved as
        :func:`preforkd.listeners.bind` resolves them (the first address wins); a name that
        does not resolve overlaps nothing here (binding it reports the error)."""
        mine, theirs = self.identity(), other.identity()
        if mine is None or theirs is None or mine[0] != theirs[0] or mine[2] != theirs[2]:
            return False
        if mine == theirs or self.kind == "unix":
            return mine == theirs
        a, b = self._bind_ip(), other._bind_ip()
        if a is None or b is None or a.version != b.version:
            return False
        return a == b or a.is_unspecified or b.is_unspecified

    def _bind_ip(self) -> Optional[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(self.host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            return ipaddress.ip_address(str(infos[0][4][0]).partition("%")[0])
        except (OSError, IndexError, ValueError):
            return None


def parse_address(text: str, base_dir: str = ".") -> Address:
    """Parse one ``listen`` entry.

    :param text: ``tcp://HOST:PORT`` or ``unix:PATH``.
    :param base_dir: directory that relative Unix socket paths are resolved against.
    :returns: an :class:`Address`; IPv6 hosts are stored without brackets, compressed.
    :raises AddressError: naming what is wrong.
    """
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise AddressError(f'"{text}": a unix: address needs a path')
        path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))
        if len(os.fsencode(path)) > 107:
            raise AddressError(f'"{text}": Unix socket path is longer than 107 bytes')
        return Address(kind="unix", path=path)
    if text.startswith("tcp://"):
        rest = text[len("tcp://"):]
        if rest.startswith("["):
            host, sep, tail = rest[1:].partition("]")
            if not sep or not tail.startswith(":"):
                raise AddressError(f'"{text}": expected tcp://[IPV6]:PORT')
            port_text = tail[1:]
            try:
                host = str(ipaddress.IPv6Address(host))
            except ValueError:
                raise AddressError(f'"{text}": "{host}" is not an IPv6 address') from None
        else:
            host, sep, port_text = rest.rpartition(":")
            if not sep or not host:
                raise AddressError(f'"{text}": expected tcp://HOST:PORT')
            if ":" in host:
                raise AddressError(f'"{text}": put an IPv6 address in brackets, e.g. tcp://[::1]:7000')
            if host == "*":
                host = "0.0.0.0"
            if not all(c.isascii() and (c.isalnum() or c in "-.") for c in host):
                raise AddressError(f'"{text}": "{host}" is not a host name or IPv4 address')
            if all(c.isdigit() or c == "." for c in host):
                try:
                    ipaddress.IPv4Address(host)
                except ValueError:
                    raise AddressError(f'"{text}": "{host}" is not an IPv4 address') from None
        if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
            raise AddressError(f'"{text}": port must be a number from 0 to 65535, got "{port_text}"')
        return Address(kind="tcp", host=host, port=int(port_text))
    raise AddressError(f'"{text}": must start with tcp:// or unix:')
