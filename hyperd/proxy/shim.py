"""Shim-side commands and streams of a client connection (ccproxy spec §6.5-§6.8).

ConnectShim claims a token's I/O session, DisconnectShim frees it (and, as with the
reference, closes the connection without a response), Signal reaches the process through the
agent (KILLCONTAINER, WINSIZE, or SIGNALPROCESS toward hyperhq for exec'd processes), stdin is
forwarded on the session's seq once its process started. Mixed into
:class:`hyperd.proxy.client.ClientConnection`.
"""

from __future__ import annotations

import asyncio
import logging
import signal as _signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from hyperd.proxy import texts
from hyperd.proxy.gojson import GoDecodeError, decode
from hyperd.proxy.sessions import IOSession
from protocol.ccproxy import Command, ConnectShim, LogEntry, ServerConnection, Signal, Stream
from protocol.hyperstart import (
    HYPER,
    Code,
    KillCommand,
    Reply,
    SignalCommand,
    WindowSize,
    WindowSizeMessage,
    encode_message,
)

if TYPE_CHECKING:
    from hyperd.proxy.server import Proxy

log = logging.getLogger("hyperd.proxy.client")

SIGNAL_LIMIT: Final = 31  # Go's SIGUNUSED on linux/amd64: 0 <= n < 31
LOG_SOURCES: Final = frozenset(("shim", "runtime"))
LOG_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
_KILL_SIGNALS: Final = frozenset((int(_signal.SIGKILL), int(_signal.SIGTERM)))
_SIGWINCH: Final = int(_signal.SIGWINCH)
_U16: Final = 0xFFFF
ASYNC: Final = object()  # a handler will answer later through a callback
ReplyCallback = Callable[[Reply | None, str | None], None]


def decode_command(cls: Any, payload: bytes) -> Any:
    """Decode a command payload as Go would; raises CommandError with Go's text."""
    try:
        return decode(cls, payload)
    except GoDecodeError as exc:
        raise texts.CommandError(str(exc)) from None


class ShimCommands:
    """ConnectShim, DisconnectShim, Signal, and the stdin/log streams."""

    if TYPE_CHECKING:
        proxy: Proxy
        conn: ServerConnection
        session: IOSession | None
        closed: bool
        busy: bool
        _task: asyncio.Task[None] | None

        def write(self, data: bytes) -> None: ...
        def close(self) -> None: ...
        def send_output(self, stream: Stream, data: bytes) -> None: ...
        def send_exited(self, status: int) -> None: ...
        def _resume(self) -> None: ...
        def _answer(self, command: Command) -> ReplyCallback: ...

    def _connect_shim(self, payload: bytes) -> None:
        req: ConnectShim = decode_command(ConnectShim, payload)
        token = req.token
        session = self.proxy.tokens.get(token)
        if session is None:
            raise texts.CommandError(texts.unknown_token_connect(token))
        if session.claimed:
            raise texts.CommandError(texts.token_claimed(token))
        if session.freed:
            session.claimed = True  # as the reference: a second try says "already claimed"
            raise texts.CommandError(texts.token_freed(token))
        if self.session is not None and self.session is not session:
            self.session.detach_shim(self)
        self.session = session
        session.attach_shim(self)
        self.write(self.conn.send_response(Command.CONNECT_SHIM))
        session.deliver_exit()

    def _disconnect_shim(self, payload: bytes) -> None:
        session = self.session
        if session is None:
            raise texts.CommandError(texts.NOT_A_SHIM)
        self.session = None
        session.vm.free_session(session)  # closes this connection: no response, as the reference
        self.close()

    def _signal(self, payload: bytes) -> object:
        req: Signal = decode_command(Signal, payload)
        session = self.session
        if session is None:
            raise texts.CommandError(texts.NOT_A_SHIM)
        number, columns, rows = req.signalNumber, req.columns, req.rows
        if not 0 <= number < SIGNAL_LIMIT:
            raise texts.CommandError(texts.invalid_signal(number))
        if number == _SIGWINCH:
            if not columns or not rows:
                raise texts.CommandError(texts.bad_winsize(columns, rows))
        elif columns or rows:
            raise texts.CommandError(texts.size_with_signal(columns, rows, number))
        started = session.process_started.is_set() and not session.freed
        if not started and number in _KILL_SIGNALS:
            # lets an orchestrator reap a container that was created but never started
            self.write(self.conn.send_process_exited(0))
            self.write(self.conn.send_response(Command.SIGNAL))
            return None
        if started:
            return self._send_signal(session, number, columns, rows)
        return self._signal_later(session, number, columns, rows)

    async def _signal_later(
        self, session: IOSession, number: int, columns: int, rows: int
    ) -> bytes:
        try:
            async with asyncio.timeout(self.proxy.config.process_timeout):
                await session.process_started.wait()
        except TimeoutError:
            raise texts.CommandError(texts.process_timeout(session.token)) from None
        if session.freed:
            raise texts.CommandError(texts.NO_CTL_CHANNEL)
        vm = session.vm
        name, code, data = self._signal_command(session, number, columns, rows)
        reply = await vm.call(name, code, data)
        if not reply.ok:
            raise texts.CommandError(texts.agent_error(reply.payload))
        return b""

    def _send_signal(self, session: IOSession, number: int, columns: int, rows: int) -> object:
        name, code, data = self._signal_command(session, number, columns, rows)
        session.vm.request(name, code, data, self._answer_empty(Command.SIGNAL))
        return ASYNC

    def _answer_empty(self, command: Command) -> Callable[[Reply | None, str | None], None]:
        answer = self._answer(command)

        def done(reply: Reply | None, error: str | None) -> None:
            if reply is not None and reply.ok:
                reply = Reply(reply.command, True, b"")
            answer(reply, error)

        return done

    @staticmethod
    def _signal_command(
        session: IOSession, number: int, columns: int, rows: int
    ) -> tuple[str, int, bytes]:
        """The agent command carrying a shim's signal; raises CommandError if there is none."""
        dialect = session.vm.dialect
        if number == _SIGWINCH:
            if dialect is HYPER:
                body: Any = WindowSizeMessage(
                    container=session.container_id,
                    process=session.process_id,
                    row=rows & _U16,
                    column=columns & _U16,
                )
            else:
                body = WindowSize(seq=session.io_base, row=rows & _U16, column=columns & _U16)
            return "winsize", int(Code.WINSIZE), encode_message(body, dialect)
        if session.is_exec:
            if dialect.signal_process is None:
                raise texts.CommandError(texts.exec_signal(number))
            body = SignalCommand(
                container=session.container_id, process=session.process_id, signal=number
            )
            return "signalprocess", dialect.signal_process, encode_message(body, dialect)
        body = KillCommand(container=session.container_id, signal=number, all_processes=False)
        return "killcontainer", int(Code.KILLCONTAINER), encode_message(body, dialect)

    # -- streams ---------------------------------------------------------------------------------

    def _stream(self, stream: Stream, data: bytes) -> None:
        if stream is Stream.STDIN:
            session = self.session
            if session is None:
                log.debug("closing client: stdin without a shim session")
                self.close()
                return
            if session.process_started.is_set():
                if session.freed:
                    self.close()
                    return
                # hold further frames while the agent's tty channel is backed up
                if session.vm.write_stdin(session, data, self._resume):
                    self.busy = False
                return
            self._task = asyncio.get_running_loop().create_task(self._stdin_later(session, data))
            return
        if stream is Stream.LOG:
            self._log(data)
            self.busy = False
            return
        self.close()  # pragma: no cover - the codec refuses output streams from clients

    async def _stdin_later(self, session: IOSession, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.proxy.config.process_timeout):
                await session.process_started.wait()
        except TimeoutError:
            log.debug("closing shim: its process did not start in time")
            self.close()
            return
        except asyncio.CancelledError:
            return
        if session.freed:
            self.close()
            return
        if session.vm.write_stdin(session, data, self._resume):
            self._resume()

    def _log(self, data: bytes) -> None:
        try:
            entry: LogEntry = decode(LogEntry, data)
        except GoDecodeError:
            entry = LogEntry(source="", level="", msg="")
        level = LOG_LEVELS.get(entry.level)
        if entry.source not in LOG_SOURCES or level is None or not entry.msg:
            log.debug("closing client after an invalid log entry")
            self.close()
            return
        if log.isEnabledFor(level):
            log.log(
                level,
                "%s",
                entry.msg,
                extra={"source": entry.source, "container": entry.containerId},
            )


__all__ = ["ASYNC", "LOG_LEVELS", "SIGNAL_LIMIT", "ShimCommands", "decode_command"]
