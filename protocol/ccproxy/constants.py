"""Numbers and enumerations of the cc-proxy protocol, version 2 (spec §2, §3)."""

from __future__ import annotations

from enum import IntEnum
from typing import Final

VERSION: Final = 2
"""The only protocol version a v2 peer accepts; there is no negotiation (spec §11)."""

HEADER_WORDS: Final = 3
"""Header length written by every v2 writer, in 32-bit words."""

HEADER_SIZE: Final = 4 * HEADER_WORDS
"""Bytes of header a v2 reader understands; longer headers are skipped (spec §2)."""

MAX_HEADER_SIZE: Final = 4 * 0xFF
"""The header length field is one byte counting 32-bit words."""

MAX_PAYLOAD: Final = 4 * 1024 * 1024
"""Largest payload a decoder accepts by default. The reference has no limit; the largest real
payloads (Hyper newcontainer) are below the agent's 10240-byte ctl frame limit, so 4 MiB leaves
ample room while bounding what a broken peer can make us buffer."""

ERROR_FLAG: Final = 0x10
"""Bit 4 of header byte 6: set on responses that report an error."""

TYPE_MASK: Final = 0x0F
"""Low nibble of header byte 6: the frame type. Bits 5-7 are reserved and ignored."""


class FrameType(IntEnum):
    """Low nibble of header byte 6."""

    COMMAND = 0
    RESPONSE = 1
    STREAM = 2
    NOTIFICATION = 3


class Command(IntEnum):
    """Opcodes of command frames; a response carries its command's opcode."""

    REGISTER_VM = 0
    UNREGISTER_VM = 1
    ATTACH_VM = 2
    HYPER = 3
    CONNECT_SHIM = 4
    DISCONNECT_SHIM = 5
    SIGNAL = 6


class Stream(IntEnum):
    """Opcodes of stream frames."""

    STDIN = 0
    STDOUT = 1
    STDERR = 2
    LOG = 3


class Notification(IntEnum):
    """Opcodes of notification frames.

    ``PROCESS_EXITED`` is the reference protocol's (proxy → shim, one status byte).
    ``VM_PROCESS_EXITED`` is **hyperd's extension**, never sent by the reference cc-proxy: the
    proxy sends it to a runtime connection that asked for exit notifications
    (``exitNotifications`` in RegisterVM/AttachVM), once per process exit of the VM, with a JSON
    :class:`~protocol.ccproxy.payloads.ProcessExitNotice` payload.
    """

    PROCESS_EXITED = 0
    VM_PROCESS_EXITED = 1


OPCODES: Final[dict[FrameType, type[IntEnum]]] = {
    FrameType.COMMAND: Command,
    FrameType.RESPONSE: Command,
    FrameType.STREAM: Stream,
    FrameType.NOTIFICATION: Notification,
}
"""The opcode enumeration of each frame type; an opcode must be below its member count."""
