"""The daemon's one error tree.

Every error a caller of hyperd can see is a :class:`HyperdError`. Each subclass carries the
JSON-RPC error code and the stable ``kind`` string that the RPC layer puts in ``error.data.kind``.
Socket and anyio errors are converted into these once, at the edge where they happen.
"""

from __future__ import annotations

from typing import Any, ClassVar


class HyperdError(Exception):
    """Base of every error hyperd reports to a caller.

    ``message`` names the object and the cause; ``data`` holds extra JSON-able fields that the
    RPC layer merges into ``error.data`` next to ``kind``.
    """

    code: ClassVar[int] = -32000
    kind: ClassVar[str] = "internal"

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_error_data(self) -> dict[str, Any]:
        """The ``error.data`` object of the JSON-RPC error for this exception."""
        return {"kind": self.kind, **self.data}


class NotFound(HyperdError):
    """The named pod, container or exec process does not exist."""

    code = -32001
    kind = "not_found"


class AlreadyExists(HyperdError):
    """An object with that id exists already."""

    code = -32002
    kind = "already_exists"


class InvalidState(HyperdError):
    """The operation is not allowed in the object's current state."""

    code = -32003
    kind = "invalid_state"


class InvalidParams(HyperdError):
    """A parameter is malformed (bad id, path outside the shared root, bad value)."""

    code = -32602
    kind = "invalid_params"


class VMUnavailable(HyperdError):
    """The VM cannot be reached: its proxy connection is down, it stopped answering, or it died."""

    code = -32004
    kind = "vm_unavailable"


class ConnectionLost(VMUnavailable):
    """The proxy connection dropped while the command was in flight; its outcome is unknown."""


class Timeout(HyperdError):
    """A deadline passed before the VM answered."""

    code = -32005
    kind = "timeout"


class AgentError(HyperdError):
    """The agent in the VM answered ERROR."""

    code = -32006
    kind = "agent_error"


class ProxyError(HyperdError):
    """The proxy answered with an error response."""

    code = -32007
    kind = "proxy_error"


class Unauthorized(HyperdError):
    """The peer's credentials do not allow it to use the RPC socket."""

    code = -32008
    kind = "unauthorized"


class StateError(HyperdError):
    """hyperd's state could not be saved or read (state filesystem full, I/O error); the
    message says what was done and what was not."""

    code = -32010
    kind = "state_error"


class ShuttingDown(HyperdError):
    """hyperd is stopping: a call that waits (``container.wait``) ends; call again after the
    restart (the process keeps running, and its exit is not lost)."""

    code = -32009
    kind = "shutting_down"
