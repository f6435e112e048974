"""``Pending``: a result to come, for handlers that need no task of their own.

Most handlers are ``async def``: each call runs in a task, through every coroutine frame of the
path down to the future it waits on. A handler whose call is one request to somebody else (an
agent command: validate, send, wait for the one reply, shape it) can instead be a plain function
that does its work at once and returns a :class:`Pending`: the future of the reply, and
``then``, which turns the done future into the result (or raises, e.g. a reply mapped to a
:class:`~hyperd.errors.HyperdError`). The connection answers the call from the future's done
callback: no task, no coroutine frames, and the request is sent within the read callback that
received it.

A ``Pending`` is also awaitable (the result of ``then``), so the same plain function serves
``async`` callers, and batches (whose calls run in a task).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")


class Pending(Generic[T]):
    """``then(future)`` once ``future`` is done: the result, or the exception it raises.

    ``then`` is called with the done future (it calls ``future.result()`` itself, so that it can
    map the exception). It is not called for a cancelled future: cancelling the future cancels
    the call, as cancelling a task does.
    """

    __slots__ = ("future", "then")

    def __init__(
        self, future: asyncio.Future[Any], then: Callable[[asyncio.Future[Any]], T]
    ) -> None:
        self.future = future
        self.then = then

    def map(self, fn: Callable[[T], U]) -> Pending[U]:
        """The same future, with ``fn`` applied to what ``then`` returns."""
        then = self.then
        return Pending(self.future, lambda future: fn(then(future)))

    def __await__(self) -> Generator[Any, None, T]:
        future = self.future
        if not future.done():
            try:
                yield from future.__await__()
            except asyncio.CancelledError:
                raise
            except Exception:
                pass  # then() sees it on the future
        elif future.cancelled():
            raise asyncio.CancelledError
        return self.then(future)

    def __repr__(self) -> str:
        return f"<Pending {self.future!r}>"
