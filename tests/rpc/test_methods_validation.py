"""Params Structs that validate themselves: their errors become JSON-RPC errors, never crashes."""

from __future__ import annotations

from typing import Any

import msgspec

from hyperd.errors import InvalidParams
from hyperd.rpc.methods import CallContext, MethodTable
from protocol.jsonrpc import Request


class Checked(msgspec.Struct, forbid_unknown_fields=True):
    name: str

    def __post_init__(self) -> None:
        if not self.name.isalnum():
            raise InvalidParams(f"invalid name {self.name!r}", field="name")


class Inner(msgspec.Struct):
    value: int

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError("value must not be negative")


class Outer(msgspec.Struct):
    inner: Inner


def _table() -> MethodTable:
    table = MethodTable()

    async def echo(params: Any, ctx: CallContext) -> Any:
        return "ok"

    table.register("checked", echo, Checked)
    table.register("outer", echo, Outer)
    return table


def _call(table: MethodTable, method: str, params: dict[str, Any]) -> Any:
    prepared = table._prepare(Request(method=method, params=params, id=7), 7)
    return prepared


def test_self_validating_params_give_their_own_error() -> None:
    response = _call(_table(), "checked", {"name": "../x"})
    assert response.id == 7
    assert response.error.code == InvalidParams.code
    assert response.error.message == "invalid name '../x'"
    assert msgspec.json.decode(bytes(response.error.data)) == {
        "kind": "invalid_params",
        "field": "name",
    }


def test_other_exceptions_in_params_are_invalid_params() -> None:
    response = _call(_table(), "outer", {"inner": {"value": -1}})
    assert response.error.code == -32602
    assert "value must not be negative" in response.error.message


def test_valid_params_pass() -> None:
    method, params = _call(_table(), "checked", {"name": "abc"})
    assert method.name == "checked" and params == Checked("abc")
