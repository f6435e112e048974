"""Sans-IO implementations of the wire protocols hyperd speaks.

- :mod:`protocol.ccproxy` -- the Clear Containers proxy protocol (version 2 frames);
- :mod:`protocol.hyperstart` -- the hyperstart agent protocol (ctl and tty channels, CC and
  hyperhq dialects);
- :mod:`protocol.jsonrpc` -- JSON-RPC 2.0 with newline-delimited framing.

Nothing here performs I/O, reads a clock or imports an async library: connection objects take
bytes in (``receive_data``), hand events out (``next_event``) and turn events into bytes
(``send_*``). Only the standard library and msgspec are imported.
"""

from __future__ import annotations

from typing import Final

from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError


class _NeedData:
    """Type of :data:`NEED_DATA`."""

    _instance: _NeedData | None = None

    def __new__(cls) -> _NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __reduce__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
"""Returned by ``next_event()`` when more bytes are needed before the next event."""

__all__ = ["NEED_DATA", "LocalProtocolError", "ProtocolError", "RemoteProtocolError", "_NeedData"]
