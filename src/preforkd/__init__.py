"""preforkd: a pre-fork daemon supervisor for Unix.

The public API is the handler API (``docs/handlers.md``); everything else is the
supervisor's own machinery and may change.
"""

from .handler import CLOSE, Close, LineHandler, Reply, connection_handler
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
