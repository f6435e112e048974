"""Events handed out by the cc-proxy connection objects' ``next_event()``."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.ccproxy.constants import Command, Stream
from protocol.ccproxy.payloads import ProcessExitNotice


@dataclass(frozen=True, slots=True)
class Response:
    """Success response to ``command``; ``payload`` is raw (JSON for Register/AttachVM, the
    agent's ACK bytes for Hyper, usually empty otherwise)."""

    command: Command
    payload: bytes


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """Response with the E flag; ``message`` is its ``msg`` ("unknown error" if empty)."""

    command: Command
    message: str


@dataclass(frozen=True, slots=True)
class StreamData:
    """Process output sent to a shim (stdout or stderr)."""

    stream: Stream
    data: bytes


@dataclass(frozen=True, slots=True)
class ProcessExited:
    """The shim's process exited with ``status`` (0..255)."""

    status: int


@dataclass(frozen=True, slots=True)
class VMProcessExited:
    """hyperd's extension, on a runtime connection that asked for exit notifications: a process
    of the VM exited (``notice`` names it and carries its status)."""

    notice: ProcessExitNotice


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """Server side: a client's command; it must be answered in order (except DisconnectShim,
    after which the proxy closes the connection)."""

    command: Command
    payload: bytes


@dataclass(frozen=True, slots=True)
class StreamReceived:
    """Server side: a client's stdin data (empty = EOF) or log entry (JSON ``LogEntry``)."""

    stream: Stream
    data: bytes


__all__ = [
    "CommandReceived",
    "ErrorReply",
    "ProcessExited",
    "Response",
    "StreamData",
    "StreamReceived",
    "VMProcessExited",
]
