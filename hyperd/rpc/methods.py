"""The method table: typed params, handler errors mapped to JSON-RPC errors, call contexts."""

from __future__ import annotations

import asyncio
import dis
import inspect
import logging
import select
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from time import perf_counter
from types import CodeType
from typing import Any, Final, Protocol, TypeVar, cast, overload

import anyio
import msgspec
from msgspec import UNSET, UnsetType

from hyperd.errors import HyperdError
from hyperd.rpc.access import PeerCredentials
from hyperd.rpc.pending import Pending
from hyperd.timings import Timings
from protocol.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    ErrorObject,
    Id,
    Notification,
    Params,
    Request,
    Response,
    make_error,
)

log = logging.getLogger(__name__)

P = TypeVar("P", bound=msgspec.Struct)
H = TypeVar("H", bound=Callable[..., Awaitable[Any]])


class Channel(Protocol):
    """What a client connection offers the handlers of its calls."""

    connection_id: int
    peer: PeerCredentials

    def notify(self, method: str, params: Any = UNSET) -> bool: ...
    def on_close(self, callback: Callable[[], object]) -> None: ...
    @property
    def closed(self) -> bool: ...
    async def wait_closed(self) -> None: ...


class CallContext:
    """Passed to every handler: who called, and the connection to push notifications on.

    Contexts compare by identity; a daemon keeps a set of subscriber contexts and removes one in
    its ``on_close`` callback. ``notify``/``on_close``/``closed``/``wait_closed`` act on the
    connection the call came in on, so they stay valid after the handler has returned.
    """

    __slots__ = ("channel", "method", "request_id")

    def __init__(self, channel: Channel, method: str, request_id: Id | UnsetType) -> None:
        self.channel = channel
        self.method = method
        self.request_id = request_id
        """The request's id; ``UNSET`` for a notification."""

    @property
    def peer(self) -> PeerCredentials:
        """The calling process (pid, uid, gid, supplementary groups)."""
        return self.channel.peer

    @property
    def connection_id(self) -> int:
        """Distinguishes the server's connections (for logs and de-duplication)."""
        return self.channel.connection_id

    def notify(self, method: str, params: Any = UNSET) -> bool:
        """Queue a server-to-client notification without waiting.

        ``params`` is any JSON-able value or msgspec Struct (an object or array on the wire).
        Returns False when the connection is closed, or when its bounded queue overflowed: then
        the connection is closed (the client missed events and must resubscribe) and the
        ``on_close`` callbacks run. Raises ``protocol.LocalProtocolError`` for unencodable params.
        """
        return self.channel.notify(method, params)

    def on_close(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once the connection has closed (at once if it already has)."""
        self.channel.on_close(callback)

    @property
    def closed(self) -> bool:
        """Whether the connection has closed."""
        return self.channel.closed

    async def wait_closed(self) -> None:
        """Return once the connection has closed."""
        await self.channel.wait_closed()

    async def wait_hangup(self) -> None:
        """Return once the client has gone: closed its socket (not merely half-closed it after
        its last request, which still gets its answers), or the connection closed.

        For calls that wait on something else for a long time (``container.wait``): a client
        that is gone leaves no call behind. The socket's hang-up is watched through an epoll
        instance of its own that reports only ``EPOLLHUP`` (both directions shut down), so
        pending requests and a half-close do not wake it.
        """
        socket_fd = getattr(self.channel, "socket_fd", None)
        fd = socket_fd() if socket_fd is not None else None
        if fd is None:
            await self.channel.wait_closed()
            return
        with select.epoll(1) as hangup:
            try:
                hangup.register(fd, 0)  # no event asked: EPOLLHUP and EPOLLERR always come
            except OSError:  # closed meanwhile
                await self.channel.wait_closed()
                return
            async with anyio.create_task_group() as tg:

                async def closed() -> None:
                    await self.channel.wait_closed()
                    tg.cancel_scope.cancel()

                tg.start_soon(closed)
                await anyio.wait_readable(hangup.fileno())
                tg.cancel_scope.cancel()

    def __repr__(self) -> str:
        return f"<CallContext {self.method} conn={self.connection_id} uid={self.peer.uid}>"


@dataclass(frozen=True, slots=True)
class Method:
    """One registered method."""

    name: str
    handler: Callable[[Any, CallContext], Any]
    """An ``async def``, or a plain function (see :attr:`plain`)."""
    params_type: type[msgspec.Struct] | None
    fields: frozenset[str]  # wire names of params_type's fields
    synchronous: bool = False
    """The handler is an ``async def`` whose body never awaits: a call completes in one step."""
    timing_key: str = ""
    """Where its durations are recorded: ``rpc.<name>``."""
    plain: bool = False
    """The handler is a plain function: it returns the result, or a :class:`Pending` one."""


_SUSPENDING_OPS: Final = frozenset(
    dis.opmap[name]
    for name in (
        "GET_AWAITABLE",
        "GET_AITER",
        "GET_ANEXT",
        "BEFORE_ASYNC_WITH",
        "END_ASYNC_FOR",
        "SEND",
        "YIELD_VALUE",
        "YIELD_FROM",
        "GET_YIELD_FROM_ITER",
        "ASYNC_GEN_WRAP",
    )
    if name in dis.opmap
)
"""Opcodes through which a coroutine can suspend (await, async for/with); names per version."""


_ASYNC_FLAGS: Final = (
    inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE
)


def _code_of(handler: Callable[..., Any]) -> CodeType | None:
    """The code object of a function or bound method (``None`` for other callables)."""
    return getattr(getattr(handler, "__func__", handler), "__code__", None)


def is_plain(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` is a plain function or bound method (not ``async def``, not a
    generator): its call runs it and returns its result (see :mod:`hyperd.rpc.pending`)."""
    code = _code_of(handler)
    return code is not None and not code.co_flags & _ASYNC_FLAGS


def never_suspends(handler: Callable[..., Any]) -> bool:
    """Whether calling ``handler`` gives a coroutine that cannot suspend.

    True for an ``async def`` function (or bound method) whose own code has no await, ``async
    for`` or ``async with``: run with ``send(None)`` it returns (``StopIteration``) or raises in
    that first step. Anything else (other callables, partials) is assumed to suspend.
    """
    code = _code_of(handler)
    if code is None or not code.co_flags & inspect.CO_COROUTINE:
        return False
    return not any(op.opcode in _SUSPENDING_OPS for op in dis.get_instructions(code))


class _NeedsTask:
    """Returned by :meth:`MethodTable.dispatch_now` when the call must run in a task."""

    def __repr__(self) -> str:
        return "NEEDS_TASK"


NEEDS_TASK: Final = _NeedsTask()


class _BadParams(Exception):
    pass


def _encodable(value: Any) -> msgspec.Raw:
    """``value`` as JSON, encoded now so a bad value fails here, not in the middle of a batch."""
    return msgspec.Raw(msgspec.json.encode(value))


def _unwrap(exc: Exception) -> Exception:
    """The single leaf of (nested) one-exception groups, e.g. from a handler's task group."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class MethodTable:
    """Method name -> handler with a typed params Struct.

    A handler is ``async def handler(params: ParamsStruct, ctx: CallContext) -> result`` where
    the result is JSON-able or a msgspec Struct, or a plain ``def`` with the same signature that
    returns the result or a :class:`Pending` one (see :mod:`hyperd.rpc.pending`). Params are
    by-name (a JSON object, or absent meaning ``{}``) decoded with ``msgspec.convert`` into
    ``params_type``; a method registered without ``params_type`` gets ``None`` and accepts only
    absent or empty params.
    """

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}
        self.timings: Timings | None = None
        """Where each handler's duration is recorded (``rpc.<method>``), if set."""

    @overload
    def register(
        self,
        name: str,
        handler: Callable[[P, CallContext], Any],
        params_type: type[P],
    ) -> None: ...
    @overload
    def register(
        self,
        name: str,
        handler: Callable[[None, CallContext], Any],
        params_type: None = None,
    ) -> None: ...
    def register(
        self,
        name: str,
        handler: Callable[[Any, CallContext], Any],
        params_type: type[msgspec.Struct] | None = None,
    ) -> None:
        """Add a method. Raises ``ValueError`` if ``name`` is taken.

        ``handler`` is an ``async def`` (its calls run in a task, unless it never awaits), or a
        plain function returning the result or a :class:`Pending` one (its calls need no task:
        see :mod:`hyperd.rpc.pending`).
        """
        if name in self._methods:
            raise ValueError(f"method {name!r} registered twice")
        fields: frozenset[str] = frozenset()
        if params_type is not None:
            fields = frozenset(f.encode_name for f in msgspec.structs.fields(params_type))
        self._methods[name] = Method(
            name,
            handler,
            params_type,
            fields,
            never_suspends(handler),
            "rpc." + name,
            is_plain(handler),
        )

    def method(
        self, name: str, params_type: type[msgspec.Struct] | None = None
    ) -> Callable[[H], H]:
        """Decorator form of :meth:`register`."""

        def decorate(handler: H) -> H:
            self.register(name, handler, params_type)
            return handler

        return decorate

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def runs_in_task(self, name: str) -> bool:
        """Whether a call of ``name`` needs a task of its own (:meth:`dispatch_now` would
        answer ``NEEDS_TASK``): a known method whose handler may suspend, or any call when a
        subclass overrides :meth:`dispatch`. Lets the caller skip setting up
        :meth:`dispatch_now`'s context for those."""
        if type(self).dispatch is not MethodTable.dispatch:
            return True
        method = self._methods.get(name)
        return method is not None and not (method.synchronous or method.plain)

    def names(self) -> list[str]:
        """Registered method names, sorted."""
        return sorted(self._methods)

    @staticmethod
    def _decode_params(method: Method, params: Params | UnsetType) -> Any:
        if method.params_type is None:
            if params is UNSET or not params:
                return None
            raise _BadParams(f"method {method.name!r} takes no params")
        if params is UNSET:
            params = {}
        if not isinstance(params, dict):
            raise _BadParams("params must be an object (by-name)")
        if not params.keys() <= method.fields:
            unknown = sorted(k for k in params if k not in method.fields)
            raise _BadParams(f"unknown field `{unknown[0]}`")
        try:
            return msgspec.convert(params, method.params_type)
        except msgspec.ValidationError as err:
            raise _BadParams(str(err)) from None

    async def dispatch(self, msg: Request | Notification, ctx: CallContext) -> Response | None:
        """Run the call; the response to send for a request, ``None`` for a notification.

        Never raises except cancellation: an unknown method -> ``METHOD_NOT_FOUND``; bad
        params -> ``INVALID_PARAMS`` (``data.kind`` "invalid_params", message naming the field);
        a :class:`HyperdError` -> its code, message and ``to_error_data()``; anything else,
        including an unencodable result -> ``INTERNAL_ERROR``, logged with its traceback.
        Errors of notifications are logged only.
        """
        id: Id = msg.id if isinstance(msg, Request) else None
        prepared = self._prepare(msg, id)
        if isinstance(prepared, Response):
            return self._answer(msg, prepared)
        method, params = prepared
        start = perf_counter()
        try:
            if method.plain:
                value = method.handler(params, ctx)
                if isinstance(value, Pending):
                    value = await value
            else:
                value = await method.handler(params, ctx)
            response = Response(id=id, result=_encodable(value))
        except Exception as raised:
            response = self._failure(raised, method, ctx, id)
        return self._done(msg, method, start, response)

    def dispatch_now(
        self, msg: Request | Notification, ctx: CallContext
    ) -> Response | Pending[Response | None] | _NeedsTask | None:
        """:meth:`dispatch` without a task switch if the call cannot suspend, else ``NEEDS_TASK``.

        Answered at once: unknown methods, bad params, and methods whose handler never suspends
        (:attr:`Method.synchronous`), whose coroutine is run to completion here with
        ``send(None)``. A plain handler runs here too; if it returns a :class:`Pending`, so
        does this: the response (or ``None`` for a notification) once its future is done,
        which its ``then`` builds without raising. The caller must be on the event loop's
        thread, inside a task as far as ``asyncio.current_task()`` is concerned (anyio looks the
        task up even in code that does not await). A subclass that overrides :meth:`dispatch`
        always gets ``NEEDS_TASK``.
        """
        if self.runs_in_task(msg.method):
            return NEEDS_TASK
        id: Id = msg.id if isinstance(msg, Request) else None
        prepared = self._prepare(msg, id)
        if isinstance(prepared, Response):
            return self._answer(msg, prepared)
        method, params = prepared
        start = perf_counter()
        if method.plain:
            try:
                value = method.handler(params, ctx)
                if isinstance(value, Pending):
                    finish = partial(self._finish, msg, method, ctx, id, start, value.then)
                    return Pending(value.future, finish)
                response = Response(id=id, result=_encodable(value))
            except Exception as raised:
                response = self._failure(raised, method, ctx, id)
            return self._done(msg, method, start, response)
        coro = cast(Coroutine[Any, Any, Any], method.handler(params, ctx))
        try:
            coro.send(None)
        except StopIteration as done:
            try:
                response = Response(id=id, result=_encodable(done.value))
            except Exception as raised:
                response = self._failure(raised, method, ctx, id)
        except Exception as raised:
            response = self._failure(raised, method, ctx, id)
        else:  # a handler object that does not run the code it was registered with
            coro.close()
            failure = RuntimeError(f"handler of {method.name} suspended; it was never expected to")
            response = self._failure(failure, method, ctx, id)
        return self._done(msg, method, start, response)

    def _finish(
        self,
        msg: Request | Notification,
        method: Method,
        ctx: CallContext,
        id: Id,
        start: float,
        then: Callable[[asyncio.Future[Any]], Any],
        future: asyncio.Future[Any],
    ) -> Response | None:
        """The response of a call whose plain handler returned a :class:`Pending`, once its
        future is done (not cancelled); never raises."""
        try:
            response = Response(id=id, result=_encodable(then(future)))
        except Exception as raised:
            response = self._failure(raised, method, ctx, id)
        return self._done(msg, method, start, response)

    def _done(
        self, msg: Request | Notification, method: Method, start: float, response: Response
    ) -> Response | None:
        """A call of ``method`` begun at ``start`` ended with ``response``: time it, answer."""
        if self.timings is not None:
            self.timings.since(method.timing_key, start)
        return self._answer(msg, response)

    @staticmethod
    def _answer(msg: Request | Notification, response: Response) -> Response | None:
        if isinstance(msg, Notification):
            if response.error is not UNSET:
                log.info("notification %s failed: %s", msg.method, response.error)
            return None
        return response

    def _prepare(self, msg: Request | Notification, id: Id) -> tuple[Method, Any] | Response:
        """The method and its decoded params, or the error response to answer with."""
        method = self._methods.get(msg.method)
        if method is None:
            return make_error(
                METHOD_NOT_FOUND, f"no method {msg.method!r}", id=id, method=msg.method
            )
        try:
            return method, self._decode_params(method, msg.params)
        except _BadParams as err:
            return make_error(INVALID_PARAMS, str(err), id=id)
        except HyperdError as err:
            # a params Struct that validates itself (``__post_init__``) raises e.g. InvalidParams
            return self._hyperd_error(err, id, method.name)
        except Exception as raised:
            log.exception("decoding the params of %s failed", method.name, exc_info=raised)
            return make_error(INVALID_PARAMS, f"{type(raised).__name__}: {raised}", id=id)

    def _failure(self, raised: Exception, method: Method, ctx: CallContext, id: Id) -> Response:
        exc = _unwrap(raised)
        if isinstance(exc, HyperdError):
            return self._hyperd_error(exc, id, method.name)
        log.exception("method %s (uid %d) failed", method.name, ctx.peer.uid, exc_info=raised)
        return make_error(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", id=id)

    @staticmethod
    def _hyperd_error(exc: HyperdError, id: Id, name: str) -> Response:
        try:
            data = _encodable(exc.to_error_data())
        except (TypeError, ValueError, msgspec.EncodeError):
            log.exception("method %s raised %s with unencodable data", name, type(exc).__name__)
            data = _encodable({"kind": exc.kind})
        return Response(id=id, error=ErrorObject(code=exc.code, message=exc.message, data=data))
