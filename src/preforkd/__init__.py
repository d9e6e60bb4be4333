"""preforkd: a pre-fork daemon supervisor for Unix.

The public API is the handler API (``docs/handlers.md``); everything else is the
supervisor's own machinery and may change.
"""

from typing import TYPE_CHECKING, Any

from .handler import CLOSE, Close, LineHandler, Reply, connection_handler

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import BadEncoding, Connection, IdleTimeout, LineTimeout, LineTooLong, ProtocolError

__all__ = [
    "CLOSE",
    "BadEncoding",
    "Close",
    "Connection",
    "IdleTimeout",
    "LineHandler",
    "LineTimeout",
    "LineTooLong",
    "ProtocolError",
    "Reply",
    "connection_handler",
]
__version__ = "0.1.0"

_FROM_PROTOCOL = ("BadEncoding", "Connection", "IdleTimeout", "LineTimeout", "LineTooLong", "ProtocolError")


def __getattr__(name: str) -> Any:
    """The connection-level names come from :mod:`preforkd.protocol` on first use (PEP 562),
    so that ``preforkd check`` and a reloading master's fresh start do not import the
    serving code before they need it."""
    if name in _FROM_PROTOCOL:
        from . import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module 'preforkd' has no attribute {name!r}")
