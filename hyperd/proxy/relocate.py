"""Sequence-number relocation of Hyper newcontainer / execcmd (ccproxy spec §7).

The client sends the agent JSON without stream seqs; the proxy decodes it, fills in
``process.stdio`` (and ``process.stderr`` unless the process has a terminal) from the token's
session, and re-encodes it:

- CC dialect: as Go re-encodes cc-proxy 3.0.23's vendored structs (conformance README item 4):
  unknown keys dropped, struct key order, explicit zero values, ``<``/``>``/``&`` escaped, map
  keys sorted; ``CPUShares`` and ``process.id`` are not in those structs, so they are dropped;
- hyperhq dialect: only the keys hyperhq's strict parser knows, with ``process.id`` always
  present (the client's, else the decimal stdio seq) -- exit events name the process by it.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Annotated, Any, Final, Union, get_args, get_origin

import msgspec

from hyperd.proxy import texts
from hyperd.proxy.gojson import syntax_error
from protocol import ProtocolError
from protocol.hyperstart import (
    HYPER,
    Container,
    Dialect,
    ExecCommand,
    MessageError,
    Process,
    decode_message,
    encode_message,
)

NEWCONTAINER: Final = "newcontainer"
EXECCMD: Final = "execcmd"
PROCESS_COMMANDS: Final = frozenset((NEWCONTAINER, EXECCMD))


@dataclass(frozen=True, slots=True)
class Relocated:
    """The re-encoded agent payload and what the session needs to know about the process."""

    payload: bytes
    container_id: str
    process_id: str
    terminal: bool


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    type: Any


_TABLES: dict[type[Any], tuple[dict[str, _Field], dict[str, _Field]]] = {}


def _bare(tp: Any) -> Any:
    """``tp`` without Annotated/Optional wrappers."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else Any
        else:
            return tp


def _table(cls: type[Any]) -> tuple[dict[str, _Field], dict[str, _Field]]:
    table = _TABLES.get(cls)
    if table is None:
        exact = {f.encode_name: _Field(f.encode_name, f.type) for f in msgspec.structs.fields(cls)}
        folded: dict[str, _Field] = {}
        for key, info in exact.items():
            folded.setdefault(key.casefold(), info)
        table = _TABLES[cls] = (exact, folded)
    return table


def _go_view(tp: Any, value: Any) -> Any:
    """``value`` (decoded JSON) as Go's decoder sees it for type ``tp``: keys matched
    case-insensitively (an exact match wins), unknown keys and nulls dropped (a null leaves
    Go's zero value, the same as an absent key)."""
    tp = _bare(tp)
    if isinstance(value, dict):
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            exact, folded = _table(tp)
            out: dict[str, Any] = {}
            for key, item in value.items():
                info = exact.get(key) or folded.get(key.casefold())
                if info is not None and item is not None:
                    out[info.name] = _go_view(info.type, item)
            return out
        if get_origin(tp) is dict:
            item_type = get_args(tp)[1]
            return {k: _go_view(item_type, v) for k, v in value.items() if v is not None}
    if isinstance(value, list) and get_origin(tp) is list:
        item_type = get_args(tp)[0]
        return [_go_view(item_type, item) for item in value]
    return value


def _decode(cls: type[Container] | type[ExecCommand], data: bytes) -> Container | ExecCommand:
    text = syntax_error(data)
    if text is not None:
        raise texts.CommandError(text)
    try:
        return decode_message(cls, msgspec.json.encode(_go_view(cls, msgspec.json.decode(data))))
    except (MessageError, msgspec.MsgspecError, UnicodeDecodeError) as exc:
        raise texts.CommandError(str(exc)) from None


def _place(process: Process, io_base: int, dialect: Dialect) -> Process:
    if process.stdio:
        raise texts.CommandError(texts.prefilled_stdio(process.stdio))
    if process.stderr:
        raise texts.CommandError(texts.prefilled_stderr(process.stderr))
    stderr = 0 if process.terminal else io_base + 1
    if dialect is HYPER:
        return msgspec.structs.replace(
            process, stdio=io_base, stderr=stderr, id=process.id or str(io_base)
        )
    return msgspec.structs.replace(process, stdio=io_base, stderr=stderr, id="")


def relocate(name: str, data: bytes, io_base: int, dialect: Dialect) -> Relocated:
    """Fill in the seqs of a newcontainer/execcmd ``data`` for the session at ``io_base``.

    Raises :class:`texts.CommandError` with the reference's texts (decode error, prefilled
    seqs) or ours (no process: the reference crashes).
    """
    if name == NEWCONTAINER:
        container = _decode(Container, data)
        assert isinstance(container, Container)
        if container.process is None:
            raise texts.CommandError(texts.no_process(name))
        process = _place(container.process, io_base, dialect)
        constraints = container.constraints
        if dialect is not HYPER and constraints.cpu_shares:
            constraints = msgspec.structs.replace(constraints, cpu_shares=0)
        body: Container | ExecCommand = msgspec.structs.replace(
            container, process=process, constraints=constraints
        )
        container_id = container.id
    else:
        command = _decode(ExecCommand, data)
        assert isinstance(command, ExecCommand)
        process = _place(command.process, io_base, dialect)
        body = msgspec.structs.replace(command, process=process)
        container_id = command.container
    try:
        payload = encode_message(body, dialect)
    except ProtocolError as exc:  # not representable in the dialect
        raise texts.CommandError(str(exc)) from None
    return Relocated(payload, container_id, process.id, process.terminal)


__all__ = ["EXECCMD", "NEWCONTAINER", "PROCESS_COMMANDS", "Relocated", "relocate"]
