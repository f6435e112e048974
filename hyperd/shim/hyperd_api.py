"""The shim's calls to hyperd's RPC socket, with hyperd's errors turned into ttrpc statuses.

Each call uses its own connection: the shim makes a few calls per task, and a hyperd restart
(pods keep running) then costs nothing but the calls made while it was down.
"""

from __future__ import annotations

from typing import Any, Final

import anyio

from hyperd.rpc.client import RemoteError, RPCClient, RPCConnectionClosed
from hyperd.shim.ttrpc import Code, TtrpcError

_KIND_CODES: Final = {
    "not_found": Code.NOT_FOUND,
    "already_exists": Code.ALREADY_EXISTS,
    "invalid_state": Code.FAILED_PRECONDITION,
    "invalid_params": Code.INVALID_ARGUMENT,
    "vm_unavailable": Code.UNAVAILABLE,
    "timeout": Code.DEADLINE_EXCEEDED,
}


CALL_DEADLINE: Final = 120.0
"""Seconds for one hyperd call: far above hyperd's own deadlines (a VM's READY 35 s, a command
30 s), so it only ends a call to a hyperd that hangs."""


class HyperdError(TtrpcError):
    """A failed hyperd call; ``kind`` is hyperd's ``error.data.kind`` (``None`` when hyperd
    could not be reached)."""

    def __init__(self, code: Code, message: str, kind: str | None) -> None:
        super().__init__(code, message)
        self.kind = kind


class HyperdAPI:
    """hyperd's JSON-RPC methods, called on the socket at ``socket``."""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """The method's result; raises :class:`HyperdError`."""
        try:
            with anyio.fail_after(CALL_DEADLINE):
                async with RPCClient.connect(self.socket) as client:
                    return await client.call(method, params)
        except BaseException as raised:
            exc = _leaf(raised)
            if isinstance(exc, RemoteError):
                code = _KIND_CODES.get(exc.kind or "", Code.UNKNOWN)
                raise HyperdError(code, f"hyperd {method}: {exc.message}", exc.kind) from None
            if isinstance(exc, TimeoutError):
                raise HyperdError(
                    Code.DEADLINE_EXCEEDED,
                    f"hyperd {method}: no answer within {CALL_DEADLINE:.0f} s",
                    "timeout",
                ) from None
            if isinstance(exc, OSError | RPCConnectionClosed):
                raise HyperdError(
                    Code.UNAVAILABLE,
                    f"hyperd {method}: cannot reach hyperd at {self.socket}: {exc}",
                    None,
                ) from None
            raise


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (the client's task group wraps
    what its block raised)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
