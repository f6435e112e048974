"""Newline-delimited framing with a size cap that never buffers an oversized message whole."""

from __future__ import annotations

from collections import deque
from typing import ClassVar, Final

from protocol.errors import RemoteProtocolError
from protocol.jsonrpc.messages import INVALID_REQUEST, ErrorObject

MAX_MESSAGE: Final = 1 << 20
"""Default cap on one message (bytes before its newline): far above any hyperd request."""

_NEWLINE: Final = b"\n"


class MessageTooLarge(RemoteProtocolError):
    """The peer sent a line longer than the framer's ``max_message``.

    The framer has already dropped the line's bytes (up to and including its newline once that
    arrives) and carries on with the next message; the connection is still usable. ``code`` is the
    JSON-RPC error code to answer with (the id of the dropped request is unknown: answer null).
    """

    code: ClassVar[int] = INVALID_REQUEST

    def __init__(self, max_message: int) -> None:
        super().__init__(f"message too large (more than {max_message} bytes)")
        self.max_message = max_message

    def error_object(self) -> ErrorObject:
        """The JSON-RPC error object a server answers this with (with id null)."""
        return ErrorObject(
            code=self.code,
            message=f"Invalid Request: {self}",
            data={"kind": "message_too_large", "max_message": self.max_message},
        )


class _TooLarge:
    """Marks where an oversized line was in the stream, so errors keep their order."""


_TOO_LARGE: Final = _TooLarge()


class LineFramer:
    """Splits a byte stream into messages at ``\\n``; accepts any split of the stream.

    ``feed(data)`` takes bytes; ``next_line()`` returns the next complete message (without its
    newline; blank lines are skipped), ``None`` when more bytes are needed, or raises
    :class:`MessageTooLarge` once per line longer than ``max_message`` bytes. An oversized line is
    detected as soon as its first ``max_message + 1`` bytes are known; its bytes are discarded as
    they arrive (never buffered past the cap) up to the next newline, after which framing resumes.

    Memory: the partial line is at most ``max_message`` bytes; complete lines are held only until
    ``next_line()`` hands them out, so a caller that drains after each ``feed`` holds at most one
    read's worth of them.
    """

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        if max_message < 1:
            raise ValueError("max_message must be positive")
        self.max_message = max_message
        self._partial = bytearray()
        self._ready: deque[bytes | _TooLarge] = deque()
        self._discarding = False

    @property
    def buffered(self) -> int:
        """Bytes of the incomplete message held (always ``<= max_message``)."""
        return len(self._partial)

    def feed(self, data: bytes | bytearray) -> None:
        """Add bytes received from the peer."""
        end = len(data) - 1
        if (
            end >= 0
            and not self._partial
            and not self._discarding
            and data.find(_NEWLINE) == end
            and end <= self.max_message
        ):
            # the common read: exactly one whole message
            line = bytes(data[:end])
            if line.strip():
                self._ready.append(line)
            return
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            newline = data.find(_NEWLINE, pos)
            if self._discarding:
                if newline < 0:
                    return
                self._discarding = False
                pos = newline + 1
                continue
            if newline < 0:
                if len(self._partial) + (end - pos) > self.max_message:
                    self._overflow(discard_to_newline=True)
                else:
                    self._partial += view[pos:]
                return
            if len(self._partial) + (newline - pos) > self.max_message:
                self._overflow(discard_to_newline=False)
            else:
                self._partial += view[pos:newline]
                line = bytes(self._partial)
                self._partial.clear()
                if line.strip():
                    self._ready.append(line)
            pos = newline + 1

    def _overflow(self, *, discard_to_newline: bool) -> None:
        self._partial.clear()
        self._ready.append(_TOO_LARGE)
        self._discarding = discard_to_newline

    def next_line(self) -> bytes | None:
        """The next complete message, or ``None`` if more bytes are needed.

        Raises :class:`MessageTooLarge` (once per oversized line, in stream order); calling again
        continues with the following message.
        """
        if not self._ready:
            return None
        item = self._ready.popleft()
        if isinstance(item, _TooLarge):
            raise MessageTooLarge(self.max_message)
        return item

    def end_of_input(self) -> bytes | None:
        """At EOF: the unterminated last message, if any (and not blank), else ``None``.

        Complete lines still pending must have been taken with ``next_line()`` first.
        """
        line = bytes(self._partial)
        self._partial.clear()
        self._discarding = False
        return line if line.strip() else None
