"""Network discovery in a short-lived child process: ``python -m hyperd.daemon.netprobe NETNS``.

Why not a worker thread: pyroute2 enters a network namespace by forking a helper process and
later signals it. A process forked from the daemon inherits the event loop's signal wakeup fd, so
a SIGTERM delivered to that helper is written into the *daemon's* wakeup fd and the daemon takes
it for its own SIGTERM and shuts down. A fresh interpreter has no wakeup fd to leak into.

The child prints the :class:`hyperd.host.model.HostNetwork` as JSON on stdout and exits 0, or
prints ``{"error": {"kind", "message", "data"}}`` and exits 1; :func:`discover_network` turns
that back into the same :class:`hyperd.errors.HyperdError` subclass.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import anyio
import msgspec

from hyperd import errors
from hyperd.host.model import HostNetwork
from protocol import jsonerrors

PROBE_TIMEOUT = 30.0  # seconds for the child to read the namespace
_ERRORS: dict[str, type[errors.HyperdError]] = {
    cls.kind: cls
    for cls in (
        errors.NotFound,
        errors.InvalidParams,
        errors.InvalidState,
        errors.Timeout,
        errors.VMUnavailable,
    )
}


class _Failure(msgspec.Struct):
    kind: str
    message: str
    data: dict[str, Any] = {}


class _Reply(msgspec.Struct):
    network: HostNetwork | None = None
    error: _Failure | None = None


async def discover_network(netns: str) -> HostNetwork:
    """Links, addresses and routes of the namespace at ``netns`` (see
    :func:`hyperd.host.netns.read_network`), read in a child process."""
    try:
        with anyio.fail_after(PROBE_TIMEOUT):
            done = await anyio.run_process(
                [sys.executable, "-m", "hyperd.daemon.netprobe", netns],
                check=False,
                stdin=subprocess.DEVNULL,
            )
    except TimeoutError:
        raise errors.Timeout(
            f"reading network namespace {netns!r} took over {PROBE_TIMEOUT:g} s"
        ) from None
    try:
        reply = msgspec.json.decode(done.stdout, type=_Reply)
    except jsonerrors.DECODE_ERRORS:
        detail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise errors.HyperdError(
            f"reading network namespace {netns!r} failed: {detail[0]}"
        ) from None
    if reply.error is not None:
        cls = _ERRORS.get(reply.error.kind, errors.HyperdError)
        raise cls(reply.error.message, **reply.error.data)
    if reply.network is None:
        raise errors.HyperdError(f"reading network namespace {netns!r} gave no result")
    return reply.network


def main(argv: list[str]) -> int:
    from hyperd.host.netns import read_network

    try:
        network = read_network(argv[0])
    except errors.HyperdError as exc:
        reply = _Reply(error=_Failure(kind=exc.kind, message=exc.message, data=exc.data))
        sys.stdout.buffer.write(msgspec.json.encode(reply))
        return 1
    sys.stdout.buffer.write(msgspec.json.encode(_Reply(network=network)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
