"""Acting as a process's shim from hyperctl: claim the token, start, stream, forward.

:func:`attach_and_start` does what the C shim does around one process: ConnectShim with the
token, then (once the start call returned) stdin → Stream stdin (EOF as an empty frame), signals
→ Signal (SIGWINCH with the terminal size), stdout/stderr → our fds, and the ProcessExited
status as the result.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.abc

from hyperd.cli.client import RPCClient, ShimClient

EXIT_NO_STATUS = 255  # the process's exit status never arrived (proxy closed the connection)
STDIN_CHUNK = 8192  # bytes per stdin frame (the C shim reads BUFSIZ)


async def _forward_stdin(shim: ShimClient) -> None:
    """Forward stdin until its EOF. Reads wait on the event loop (no worker thread: a thread
    blocked in read() on a terminal would keep hyperctl from exiting after the process ended)."""
    fd = sys.stdin.fileno()
    pollable = True
    while True:
        if pollable:
            try:
                await anyio.wait_readable(fd)
            except OSError:
                pollable = False  # a regular file or /dev/null: reading never blocks
        data = os.read(fd, STDIN_CHUNK)
        await shim.send_stdin(data)
        if not data:
            return


FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)


def _terminal_size() -> tuple[int, int] | None:
    try:
        size = os.get_terminal_size(sys.stdin.fileno())
    except OSError:
        return None
    return size.columns, size.lines


async def _forward_signals(
    shim: ShimClient,
    started: anyio.Event,
    *,
    terminal: bool,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """As the C shim does: signals to hyperctl go to the process; SIGWINCH carries the size.

    The handlers are installed at once (reported through ``task_status``); signals that come
    before the process has started are queued until ``started`` is set."""
    with anyio.open_signal_receiver(*FORWARDED_SIGNALS) as signals:
        task_status.started()
        await started.wait()
        if terminal and (size := _terminal_size()):
            await shim.send_winsize(*size)
        async for signum in signals:
            if signum == signal.SIGWINCH:
                if terminal and (size := _terminal_size()):
                    await shim.send_winsize(*size)
            else:
                await shim.send_signal(signum)


@contextlib.contextmanager
def _raw_terminal(enabled: bool) -> Iterator[None]:
    """Put stdin in raw mode for a terminal process (restored on exit)."""
    fd = sys.stdin.fileno()
    if not enabled or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def attach_and_start(
    client: RPCClient,
    url: str,
    token: str,
    start_method: str,
    start_params: dict[str, Any],
    *,
    stdin: bool,
    terminal: bool = False,
) -> int:
    """Claim ``token`` as the shim, call ``start_method``, stream output, forward stdin and
    signals; returns the process's exit status."""
    shim = await ShimClient.connect(url, token)
    try:
        await shim.wait_connected()
        out, err = sys.stdout.buffer, sys.stderr.buffer

        def write(stream: Any) -> Any:
            def w(data: bytes) -> None:
                stream.write(data)
                stream.flush()

            return w

        status_box: list[int | None] = []
        helpers: list[anyio.CancelScope] = []  # the stdin and signal forwarders
        finished = anyio.Event()

        async def pump() -> None:
            status_box.append(await shim.pump(write(out), write(err)))
            finished.set()
            for scope in helpers:
                scope.cancel()

        started = anyio.Event()

        async def forward_signals(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with anyio.CancelScope() as scope:
                helpers.append(scope)
                await _forward_signals(shim, started, terminal=terminal, task_status=task_status)

        async def forward_stdin() -> None:
            with anyio.CancelScope() as scope:
                helpers.append(scope)
                if finished.is_set():
                    # the process exited before this forwarder ran: a read of stdin now would
                    # block hyperctl until the user typed something
                    return
                await _forward_stdin(shim)

        with _raw_terminal(terminal and stdin):
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump)
                await tg.start(forward_signals)
                await client.call(start_method, start_params)
                started.set()
                if stdin:
                    tg.start_soon(forward_stdin)
        status = status_box[0] if status_box else None
    finally:
        await shim.disconnect()
    return EXIT_NO_STATUS if status is None else status
