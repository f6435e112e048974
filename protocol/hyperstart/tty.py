"""Sans-IO host end of the tty channel (spec §6).

An empty frame is an EOF for its seq. In the H07/CC dialects the agent then reports the exit
status as a 1-byte frame on the same seq (spec §6.4): the first frame of a seq after its EOF is
the status when it carries exactly one byte, and ordinary data otherwise. A 1-byte frame before
any EOF is ordinary output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from protocol import NEED_DATA, _NeedData
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.hyperstart.framing import (
    DEFAULT_MAX_FRAME,
    TTY_HEADER_SIZE,
    TtyDecoder,
    encode_tty,
)

__all__ = ["HostTtyConnection", "TtyData", "TtyEof", "TtyExitStatus"]

# Seqs whose EOF arrived and whose status frame is still awaited. A peer that sends EOFs without
# statuses (hyperhq) must not grow this without bound: the oldest entries are forgotten.
MAX_EOF_TRACKED: Final = 4096
_STATUS_FRAME_SIZE: Final = 1


@dataclass(frozen=True, slots=True)
class TtyData:
    """Output (stdout or stderr) of the process owning ``seq``."""

    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TtyEof:
    """End of output on ``seq``: the process has exited and its output is drained."""

    seq: int


@dataclass(frozen=True, slots=True)
class TtyExitStatus:
    """Exit status (0..255) of the process whose stdio seq is ``seq`` (H07/CC)."""

    seq: int
    status: int


TtyEvent = TtyData | TtyEof | TtyExitStatus


class HostTtyConnection:
    """The host end of the tty channel.

    ``exit_status_frames=False`` turns the 1-byte-status rule off (hyperhq >= v0.8 reports exit
    codes on ctl); every non-empty frame is then TtyData.
    Raises RemoteProtocolError for bad framing and for EOF in the middle of a frame.
    """

    __slots__ = ("_closed", "_decoder", "_eof_seqs", "exit_status_frames")

    def __init__(
        self, *, max_frame: int = DEFAULT_MAX_FRAME, exit_status_frames: bool = True
    ) -> None:
        self._decoder = TtyDecoder(max_frame)
        self._eof_seqs: dict[int, None] = {}  # insertion-ordered set
        self._closed = False
        self.exit_status_frames = exit_status_frames

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the tty socket; ``b""`` means the peer closed it."""
        if data:
            self._decoder.feed(data)
        else:
            self._closed = True

    def next_event(self) -> TtyEvent | _NeedData:
        """Return the next event, or NEED_DATA when more bytes are needed."""
        frame = self._decoder.next_frame()
        if frame is None:
            if self._closed and self._decoder.buffered:
                raise RemoteProtocolError(
                    f"tty channel closed in the middle of a frame ({self._decoder.buffered} bytes)"
                )
            return NEED_DATA
        seq, data = frame.seq, frame.data
        if not data:
            if self.exit_status_frames:
                eofs = self._eof_seqs
                eofs.pop(seq, None)
                eofs[seq] = None
                if len(eofs) > MAX_EOF_TRACKED:
                    del eofs[next(iter(eofs))]
            return TtyEof(seq)
        after_eof = bool(self._eof_seqs) and self._eof_seqs.pop(seq, False) is None
        if after_eof and len(data) == _STATUS_FRAME_SIZE:
            return TtyExitStatus(seq, data[0])
        return TtyData(seq, data)

    @staticmethod
    def send_stdin(seq: int, data: bytes, *, max_frame: int | None = None) -> bytes:
        """Return the frames carrying ``data`` as stdin of ``seq``; ``b""`` gives an EOF frame.

        With ``max_frame`` (e.g. MAX_TTY_FRAME_HYPER) the data is split so that no frame,
        header included, is longer. Raises LocalProtocolError if ``max_frame`` leaves no room for
        data.
        """
        if max_frame is None or TTY_HEADER_SIZE + len(data) <= max_frame:
            return encode_tty(seq, data)
        room = max_frame - TTY_HEADER_SIZE
        if room <= 0:
            raise LocalProtocolError(
                f"max_frame {max_frame} leaves no room after the {TTY_HEADER_SIZE}-byte header"
            )
        view = memoryview(data)
        return b"".join(
            encode_tty(seq, bytes(view[start : start + room]))
            for start in range(0, len(data), room)
        )

    @staticmethod
    def send_eof(seq: int) -> bytes:
        """Return the EOF frame (empty data) closing the stdin of ``seq``."""
        return encode_tty(seq, b"")
