"""A pod's VM as seen through its proxy: registration, tokens, liveness and reconnection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import monotonic
from typing import Final

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from hyperd.errors import (
    AgentError,
    HyperdError,
    InvalidParams,
    ProxyError,
    Timeout,
    VMUnavailable,
)
from hyperd.vm.connection import Counters, VMConnection
from hyperd.vm.types import (
    REACHABLE,
    RECONNECTED,
    UNREACHABLE,
    EventKind,
    ProcessExit,
    VMConfig,
    VMEvent,
    VMStatistics,
)
from protocol import LocalProtocolError
from protocol.ccproxy import (
    AttachVM,
    Command,
    Hyper,
    PayloadError,
    ProcessExitNotice,
    RegisterVM,
    UnregisterVM,
    VMResponse,
    decode_payload,
    encode_payload,
)

log = logging.getLogger(__name__)

UNIX_SCHEME: Final = "unix://"
CONNECT_RETRY_MIN: Final = 0.01
"""First pause between connect attempts: a proxy that is just starting listens within ms."""
CONNECT_RETRY_MAX: Final = 0.1
"""Cap of the pause between first-connect attempts (the seed retries every 100 ms)."""
RECONNECT_BACKOFF_MIN: Final = 0.05
"""First pause between reconnect attempts; doubles up to ``VMConfig.reconnect_backoff_max``."""
LOG_INTERVAL: Final = 1.0
"""Retry warnings are logged at most once per this many seconds (as the seed does)."""
ALREADY_REGISTERED: Final = "container already registered"
UNKNOWN_CONTAINER: Final = "unknown containerID"
PING: Final = "ping"
PING_PAYLOAD: Final = encode_payload(Hyper(hyperName=PING))
_JSON: Final = msgspec.json.Encoder()
_HYPER: Final = Command.HYPER
"""As a module constant: reading an enum member through its class costs ~60 ns on Python 3.11."""


PLAIN_CACHE_SIZE: Final = 64
"""Encoded payloads of data-less Hyper commands kept (the agent knows a few dozen names)."""
_PLAIN_PAYLOADS: dict[str, bytes] = {}


def _plain_payload(name: str) -> bytes | Hyper:
    """The payload of ``Hyper(hyperName=name)``: its encoding, cached for the next call.

    A name that cannot be encoded gives the Struct back, so that the command reports it
    (:class:`InvalidParams`) as any other payload.
    """
    hyper = Hyper(hyperName=name)
    try:
        payload = encode_payload(hyper)
    except LocalProtocolError:
        return hyper
    if len(_PLAIN_PAYLOADS) < PLAIN_CACHE_SIZE:
        _PLAIN_PAYLOADS[name] = payload
    return payload


def hyper_payload(name: str, data: bytes | None) -> bytes | Hyper:
    """The payload of ``Hyper(hyperName=name, data=Raw(data))`` (no tokens), as
    :func:`~protocol.ccproxy.encode_payload` writes it, without encoding it again per call: its
    head is encoded once per name, and the data, the last key, is forwarded verbatim.
    ``data`` is JSON already; ``None`` or ``b""`` is no data."""
    plain: bytes | Hyper | None = _PLAIN_PAYLOADS.get(name)
    if plain is None:
        plain = _plain_payload(name)
    if not data:
        return plain
    if type(plain) is bytes:
        return plain[:-1] + b',"data":' + data + b"}"
    return Hyper(hyperName=name, data=msgspec.Raw(data))


def socket_path(url: str) -> str:
    """The socket path of a proxy URL (``unix:///path`` or a bare absolute path)."""
    path = url[len(UNIX_SCHEME) :] if url.startswith(UNIX_SCHEME) else url
    if not path.startswith("/"):
        raise ValueError(f"proxy URL {url!r} is neither unix://<absolute path> nor a path")
    return path


def _proxy_message(exc: HyperdError) -> str:
    return str(exc.data.get("proxy_message", ""))


class VMSession:
    """One VM behind one proxy, kept reachable over a persistent connection.

    Start with ``await task_group.start(session.run)``: that returns once the VM is registered
    (or attached) and raises :class:`VMUnavailable` if that fails. Then call :meth:`hyper`,
    :meth:`new_tokens`, :meth:`unregister` from any task. While the VM is unreachable every
    command fails at once with :class:`VMUnavailable`; the session keeps reconnecting and
    publishes :class:`VMEvent`s through ``on_event`` (called synchronously; keep it cheap).

    ``on_exit``: ask the proxy for exit notifications (hyperd's extension) on every
    Register/AttachVM and call ``on_exit`` (synchronously) with a :class:`ProcessExit` for each;
    :attr:`exit_notifications` says whether the proxy agreed on the current connection (the
    reference cc-proxy never does). Exits kept by the proxy while hyperd was away arrive right
    after the AttachVM of a reconnect or of a new session.
    """

    def __init__(
        self,
        vm_id: str,
        proxy_url: str,
        *,
        ctl: str | None = None,
        tty: str | None = None,
        console: str | None = None,
        register: bool = True,
        config: VMConfig = VMConfig(),  # noqa: B008 - frozen value
        on_event: Callable[[VMEvent], None] | None = None,
        on_exit: Callable[[ProcessExit], None] | None = None,
    ) -> None:
        if register and not (ctl and tty):
            raise ValueError("registering a VM needs its ctl and tty socket paths")
        self.vm_id = vm_id
        self._url = proxy_url
        self._path = socket_path(proxy_url)
        self._ctl = ctl
        self._tty = tty
        self._console = console
        self._register = register
        self._config = config
        self._on_event = on_event
        self._on_exit = on_exit
        self._exit_notifications = False
        self._io_url: str | None = None
        self._conn: VMConnection | None = None
        self._counters = Counters()
        self._reconnects = 0
        self._reachable = False
        self._reason = "not registered yet"
        self._closing = False
        self._running = False
        self._run_scope: anyio.CancelScope | None = None
        self._reconnect_scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()
        self._ping_warned: VMConnection | None = None

    # -- public state ------------------------------------------------------------------------

    @property
    def proxy_url(self) -> str:
        """The URL shims connect to (``io.URL`` of the proxy's last Register/AttachVM reply)."""
        return self._io_url if self._io_url is not None else self._url

    @property
    def reachable(self) -> bool:
        return self._reachable

    @property
    def exit_notifications(self) -> bool:
        """The proxy said (in its last Register/AttachVM reply) it sends exit notifications."""
        return self._exit_notifications

    def statistics(self) -> VMStatistics:
        conn = self._conn
        queued = in_flight = 0
        if conn is not None and not conn.closed:
            stats = conn.statistics()
            queued, in_flight = stats.queued, stats.in_flight
        c = self._counters
        return VMStatistics(
            queued=queued,
            in_flight=in_flight,
            sent=c.sent,
            failed=c.failed,
            timed_out=c.timed_out,
            reconnects=self._reconnects,
            last_rtt=c.last_rtt,
            reachable=self._reachable,
        )

    # -- commands ----------------------------------------------------------------------------

    def _usable(self, what: str) -> VMConnection:
        conn = self._conn
        if conn is None or not self._reachable or conn.closed:
            if self._closing:
                raise VMUnavailable(f"VM {self.vm_id}: session closed; {what} not sent")
            raise VMUnavailable(f"VM {self.vm_id}: unreachable ({self._reason}); {what} not sent")
        return conn

    def send(
        self,
        name: str,
        data: bytes | None = None,
        *,
        timeout: float | None = None,
    ) -> asyncio.Future[bytes]:
        """The synchronous half of :meth:`hyper`, for the common commands: no tokens, and no
        data or data already encoded (non-empty JSON ``bytes``, sent verbatim).

        The command is queued (written at once on an idle connection); the future gets the
        reply payload or the exception :meth:`hyper` would raise. Raises what :meth:`hyper`
        raises before anything is sent. Cancel the future to stop waiting: its reply is then
        discarded.
        """
        conn = self._conn
        if conn is None or not self._reachable or conn.closed:
            conn = self._usable(name)  # raises
        payload = hyper_payload(name, data)
        if timeout is None:
            timeout = self._config.command_timeout
        return conn.submit(_HYPER, payload, timeout=timeout, label=name)

    async def hyper(
        self,
        name: str,
        data: object | bytes | None = None,
        *,
        tokens: list[str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the slot outlives the caller's deadline
    ) -> bytes:
        """Send the agent command ``name`` and return the agent's raw reply payload.

        ``data`` is a msgspec Struct or JSON-able value (encoded once here), pre-encoded JSON
        ``bytes``/``msgspec.Raw`` (sent verbatim), or ``None`` (no data). ``tokens``: the I/O
        token of the process for ``newcontainer``/``execcmd``. Raises :class:`VMUnavailable`,
        :class:`ConnectionLost`, :class:`Timeout`, :class:`AgentError`, :class:`ProxyError`,
        :class:`InvalidParams` (``data`` cannot be encoded).
        """
        if tokens is None and (data is None or (type(data) is bytes and data)):
            future = self.send(name, data, timeout=timeout)  # (the common commands)
            try:
                return await future
            except BaseException:
                if not future.done():
                    future.cancel()  # as VMConnection.command: the slot stays, its reply is dropped
                raise
        conn = self._conn
        if conn is None or not self._reachable or conn.closed:
            conn = self._usable(name)  # raises
        if timeout is None:
            timeout = self._config.command_timeout
        raw: msgspec.Raw | msgspec.UnsetType
        if data is None:
            raw = msgspec.UNSET
        elif isinstance(data, msgspec.Raw):
            raw = data
        elif isinstance(data, bytes | bytearray | memoryview):
            raw = msgspec.Raw(data)
        else:
            try:
                raw = msgspec.Raw(_JSON.encode(data))
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidParams(f"VM {self.vm_id}: {name}: cannot encode data: {exc}") from None
        return await conn.command(
            Command.HYPER,
            Hyper(hyperName=name, tokens=tokens, data=raw),
            timeout=timeout,
            label=name,
        )

    async def new_tokens(self, count: int = 1) -> list[str]:
        """Allocate ``count`` I/O tokens (AttachVM with numIOStreams on the session connection).

        Raises :class:`ProxyError` if the proxy refuses or returns the wrong number of tokens,
        and the errors of :meth:`hyper`.
        """
        if count < 1:
            raise InvalidParams(f"token count must be at least 1, got {count}")
        conn = self._usable("AttachVM")
        response = await self._attach(conn, count, self._config.command_timeout)
        tokens = response.io.tokens or []
        if len(tokens) != count:
            raise ProxyError(
                f"VM {self.vm_id}: AttachVM: {len(tokens)} tokens retrieved out of {count} expected"
            )
        return list(tokens)

    async def unregister(self) -> None:
        """UnregisterVM, then :meth:`close`. Works while the VM is unreachable as long as the
        proxy answers (a fresh connection is used then); an already unknown VM counts as done.
        Raises :class:`VMUnavailable` (proxy unreachable), :class:`ProxyError`, :class:`Timeout`.
        """
        self._closing = True  # no more reconnects, and no re-registration behind our back
        if self._reconnect_scope is not None:
            self._reconnect_scope.cancel()
        try:
            conn = self._conn
            if conn is not None and self._reachable and not conn.closed:
                await self._unregister_on(conn)
            else:
                await self._unregister_fresh()
        finally:
            await self.close()

    async def _unregister_fresh(self) -> None:
        conn = await self._dial(retry_for=0.0)
        error: HyperdError | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(conn.run)
            try:
                await self._unregister_on(conn)
            except HyperdError as exc:
                error = exc
            finally:
                conn.close("UnregisterVM connection done")
        if error is not None:
            raise error

    async def _unregister_on(self, conn: VMConnection) -> None:
        try:
            await conn.command(
                Command.UNREGISTER_VM,
                UnregisterVM(containerId=self.vm_id),
                timeout=self._config.command_timeout,
            )
        except ProxyError as exc:
            if not _proxy_message(exc).startswith(UNKNOWN_CONTAINER):
                raise
            log.info("VM %s: UnregisterVM: the proxy does not know it any more", self.vm_id)

    def mark_unreachable(self, reason: str) -> None:
        """Declare the VM unreachable (e.g. its VM or proxy process died): queued and new
        commands fail at once with :class:`VMUnavailable`, in-flight ones with
        :class:`ConnectionLost`; the session reconnects with backoff."""
        if self._closing:
            return
        self._set_unreachable(reason)
        if self._conn is not None:
            self._conn.close(f"unreachable ({reason})")

    async def close(self) -> None:
        """Stop the session: fail every waiting caller, close the connection, end :meth:`run`
        (waits for it). Idempotent; does not unregister the VM."""
        self._closing = True
        self._reachable = False
        if self._conn is not None:
            self._conn.close("session closed")
        if self._run_scope is not None:
            self._run_scope.cancel()
        if self._running:
            await self._stopped.wait()

    # -- lifetime ----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Register (or attach), report started, then keep the VM reachable until :meth:`close`.

        Raises :class:`VMUnavailable` before ``task_status.started()`` if the first
        registration fails (or :meth:`close` comes first).
        """
        if self._running or self._closing:
            raise RuntimeError(f"VM {self.vm_id}: session already started or closed")
        self._running = True
        failure: VMUnavailable | None = None
        started = False
        try:
            async with anyio.create_task_group() as tg:
                self._run_scope = tg.cancel_scope
                try:
                    await self._establish(tg, initial=True)
                except VMUnavailable as exc:
                    failure = exc
                    tg.cancel_scope.cancel()
                else:
                    started = True
                    task_status.started()
                    await self._maintain(tg)
                    tg.cancel_scope.cancel()
        finally:
            self._closing = True
            self._reachable = False
            if self._conn is not None:
                self._conn.close("session closed")
            self._running = False
            self._stopped.set()
        if failure is not None:
            raise failure
        if not started:
            raise VMUnavailable(f"VM {self.vm_id}: session closed before registration completed")

    async def _maintain(self, tg: TaskGroup) -> None:
        while True:
            conn = self._conn
            assert conn is not None
            async with anyio.create_task_group() as watch:
                watch.start_soon(self._liveness, conn)
                await conn.wait_closed()
                watch.cancel_scope.cancel()
            if self._closing:
                return
            self._set_unreachable(conn.close_reason or "connection closed")
            with anyio.CancelScope() as self._reconnect_scope:
                await self._reconnect(tg)
            self._reconnect_scope = None  # closing: the loop ends at the closed connection

    async def _reconnect(self, tg: TaskGroup) -> None:
        backoff = RECONNECT_BACKOFF_MIN
        attempt = 0
        last_log = -LOG_INTERVAL
        while not self._closing:
            attempt += 1
            try:
                await self._establish(tg, initial=False)
            except VMUnavailable as exc:
                now = monotonic()
                if now - last_log >= LOG_INTERVAL:
                    log.warning("VM %s: reconnect attempt %d failed: %s", self.vm_id, attempt, exc)
                    last_log = now
            else:
                self._reconnects += 1
                log.info("VM %s: reconnected to the proxy (attempt %d)", self.vm_id, attempt)
                self._emit(RECONNECTED, f"proxy connection re-established (attempt {attempt})")
                self._set_reachable("the VM answered a ping")
                return
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, self._config.reconnect_backoff_max)

    async def _dial(self, *, retry_for: float) -> VMConnection:
        """Connect to the proxy socket, retrying for ``retry_for`` seconds with capped backoff."""
        deadline = monotonic() + retry_for
        delay = CONNECT_RETRY_MIN
        attempt = 1
        last_log = monotonic()
        while True:
            try:
                with anyio.fail_after(self._config.connect_timeout):
                    conn = await VMConnection.connect(
                        self._path,
                        vm_id=self.vm_id,
                        counters=self._counters,
                        on_exit=self._exited if self._on_exit is not None else None,
                    )
            except (OSError, TimeoutError) as exc:
                now = monotonic()
                if now >= deadline:
                    raise VMUnavailable(
                        f"VM {self.vm_id}: cannot connect to proxy {self._url}: {exc!r}"
                    ) from None
                if now - last_log >= LOG_INTERVAL:
                    log.warning(
                        "VM %s: retrying proxy connection to %s (attempt %d, %.2fs left): %r",
                        self.vm_id, self._url, attempt, deadline - now, exc,
                    )  # fmt: skip
                    last_log = now
                await anyio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, CONNECT_RETRY_MAX)
                attempt += 1
            else:
                if attempt > 1:
                    log.info("VM %s: connected to proxy (attempt %d)", self.vm_id, attempt)
                return conn

    async def _establish(self, tg: TaskGroup, *, initial: bool) -> None:
        """Connect, register or attach (and ping when attaching), make it the session's
        connection. Raises :class:`VMUnavailable`."""
        retry_for = self._config.connect_timeout if initial else 0.0
        conn = await self._dial(retry_for=retry_for)
        tg.start_soon(conn.run, name=f"VM {self.vm_id} proxy connection")
        try:
            await self._handshake(conn, initial=initial)
        except HyperdError as exc:
            conn.close(f"handshake failed ({exc})")
            if isinstance(exc, VMUnavailable):
                raise
            raise VMUnavailable(exc.message, **exc.data) from exc
        except BaseException:
            conn.close("handshake cancelled")
            raise
        self._conn = conn
        if initial:
            self._reachable = True
            self._reason = ""

    async def _handshake(self, conn: VMConnection, *, initial: bool) -> None:
        cfg = self._config
        attach_timeout = cfg.command_timeout if initial else cfg.ping_timeout
        verify = True
        if initial and self._register:
            try:
                response = await self._register_vm(conn)
                verify = False  # RegisterVM returned after the agent's READY
            except ProxyError as exc:
                if not _proxy_message(exc).endswith(ALREADY_REGISTERED):
                    raise
                log.info("VM %s: already registered with the proxy; attaching", self.vm_id)
                response = await self._attach(conn, 0, attach_timeout, notify=True)
        else:
            try:
                response = await self._attach(conn, 0, attach_timeout, notify=True)
            except ProxyError as exc:
                known = not _proxy_message(exc).startswith(UNKNOWN_CONTAINER)
                if known or not (self._ctl and self._tty) or self._closing:
                    raise
                log.warning("VM %s: the proxy forgot the VM; registering it again", self.vm_id)
                response = await self._register_vm(conn)
                verify = False
        self._io_url = response.io.URL
        self._exit_notifications = self._on_exit is not None and response.exitNotifications
        if verify:
            await conn.command(Command.HYPER, PING_PAYLOAD, timeout=cfg.ping_timeout, label=PING)

    async def _register_vm(self, conn: VMConnection) -> VMResponse:
        assert self._ctl is not None and self._tty is not None
        payload = RegisterVM(
            containerId=self.vm_id,
            ctlSerial=self._ctl,
            ioSerial=self._tty,
            console=self._console or "",
            exitNotifications=self._on_exit is not None,
        )
        reply = await conn.command(Command.REGISTER_VM, payload, timeout=self._config.ready_timeout)
        return self._decode_vm_response(reply, "RegisterVM")

    async def _attach(
        self, conn: VMConnection, count: int, deadline: float, *, notify: bool = False
    ) -> VMResponse:
        # notify only on the handshake: a token request must not change the subscription
        notify = notify and self._on_exit is not None
        payload = AttachVM(containerId=self.vm_id, numIOStreams=count, exitNotifications=notify)
        reply = await conn.command(Command.ATTACH_VM, payload, timeout=deadline)
        response = self._decode_vm_response(reply, "AttachVM")
        self._io_url = response.io.URL
        return response

    def _decode_vm_response(self, reply: bytes, what: str) -> VMResponse:
        try:
            return decode_payload(VMResponse, reply)
        except PayloadError as exc:
            raise ProxyError(f"VM {self.vm_id}: {what}: malformed reply: {exc}") from None

    # -- exits -------------------------------------------------------------------------------

    def _exited(self, notice: ProcessExitNotice) -> None:
        if self._on_exit is None or notice.containerId not in ("", self.vm_id):
            return  # a proxy may serve several VMs, but only asked ones reach this connection
        exit = ProcessExit(
            self.vm_id,
            notice.token,
            notice.container,
            notice.process,
            notice.status,
            notice.backlog,
        )
        try:
            self._on_exit(exit)
        except Exception:
            log.exception("VM %s: on_exit callback failed", self.vm_id)

    # -- liveness ----------------------------------------------------------------------------

    async def _liveness(self, conn: VMConnection) -> None:
        """Ping when idle; declare the proxy unresponsive when it leaves a reply owed too long.

        Idle (no reply owed) for ``ping_interval`` since the last bytes received: send a ping
        that must be answered within ``ping_timeout``. Replies owed: unresponsive once the
        oldest is ``ping_timeout`` past its caller's deadline with nothing received since.
        This is a heartbeat timer (at most one wake-up per ``ping_interval``) recomputed from
        the connection's state, not a poll; it costs nothing per command.
        """
        cfg = self._config
        while not conn.closed:
            now = monotonic()
            oldest = conn.oldest_deadline()
            if oldest is None:
                due = conn.last_receive + cfg.ping_interval
                if now >= due:
                    if not await self._ping(conn):
                        return
                    continue
            else:
                due = max(oldest, conn.last_receive) + cfg.ping_timeout
                if now >= due:
                    late = f"{cfg.ping_timeout:g}s"
                    self._lose(conn, f"the proxy left a reply owed {late} past its deadline")
                    return
            # Re-evaluate at least once per interval: the queue may drain (or fill) meanwhile.
            await anyio.sleep(min(due - now, cfg.ping_interval))

    async def _ping(self, conn: VMConnection) -> bool:
        """One liveness ping; False when the connection is no longer usable."""
        timeout = self._config.ping_timeout
        try:
            await conn.command(Command.HYPER, PING_PAYLOAD, timeout=timeout, label=PING)
        except AgentError as exc:
            # The agent answered, so the VM is alive; say so once per connection, not per ping.
            if conn is not self._ping_warned:
                self._ping_warned = conn
                log.warning("VM %s: the agent answers pings with an error: %s", self.vm_id, exc)
        except Timeout:
            self._lose(conn, f"no answer to a liveness ping within {timeout:g}s")
            return False
        except (ProxyError, VMUnavailable) as exc:
            if "proxy_message" in exc.data:  # the proxy answered: the VM is not usable
                self._lose(conn, f"liveness ping failed: {_proxy_message(exc)}")
            return False
        return True

    def _lose(self, conn: VMConnection, reason: str) -> None:
        self._set_unreachable(reason)
        conn.close(f"unreachable ({reason})")

    # -- state and events --------------------------------------------------------------------

    def _set_unreachable(self, reason: str) -> None:
        if not self._reachable or self._closing:
            return
        self._reachable = False
        self._reason = reason
        log.warning("VM %s: unreachable: %s", self.vm_id, reason)
        self._emit(UNREACHABLE, reason)

    def _set_reachable(self, reason: str) -> None:
        if self._reachable or self._closing:
            return
        self._reachable = True
        self._reason = ""
        self._emit(REACHABLE, reason)

    def _emit(self, kind: EventKind, reason: str) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(VMEvent(self.vm_id, kind, reason))
        except Exception:
            log.exception("VM %s: on_event callback failed for %s", self.vm_id, kind)
