"""Encoding and decoding of the JSON bodies in :mod:`protocol.hyperstart.messages`.

CC dialect: the Go encoding of the CC-VC structs -- struct key order, omitempty as documented in
``messages``, map keys sorted, ``<`` ``>`` ``&`` U+2028 U+2029 escaped as ``\\u003c``... and
backspace/form feed as ``\\u0008``/``\\u000c``, like the Go encoder of cc-proxy's era. The HYPER
dialect uses the same string escaping (runv is Go; hyperstart decodes ``\\u`` escapes).
Decoding is lenient like Go: unknown keys are ignored (but key case matters, unlike Go).

HYPER dialect: hyperhq/hyperstart parses most bodies with a strict hand-written parser and fails
(or worse, mis-parses) on keys it does not know. ``encode_message(msg, HYPER)`` therefore emits
only the keys it accepts (spec §7 "C accepts"): no ``macAddr``, no ``scsiAddr`` /
``systemMountsInfo`` / ``constraints`` / ``absolutePath``, no ``rlimits`` / ``noNewPrivileges`` /
``capabilities`` in a process, no ``allProcesses``; a ``null`` (None) is never emitted (the C
parser wants an array or string there) and a process always carries ``id`` (``str(stdio)`` when
empty: hyperstart crashes on EXECCMD while an id-less process runs). ``ProcessAsyncEvent`` always
carries ``status`` as hyperstart writes it. Bodies hyperhq has no form for (``WindowSize`` -- use
``WindowSizeMessage`` --, ``PsCommand``, ``Rlimit``, ``Capabilities``, ``SystemMountsInfo``,
``Constraints``) raise LocalProtocolError.

``decode_message(cls, payload, HYPER)`` is strict: a key hyperstart would not accept raises
MessageError. Keys hyperstart accepts but the Structs do not model (container ``addr``,
``readOnly``, ``ports``; pod ``dnsSearch``, ``dnsOptions``, ``restartPolicy``,
``portmappingWhiteLists``; interface-level ``ipAddress``/``netMask``) are accepted and dropped.
``KillCommand`` stays lenient: hyperstart parses KILLCONTAINER with parson, which ignores extra
keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar

import msgspec

from protocol import jsonerrors
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.hyperstart.dialects import CC, Dialect
from protocol.hyperstart.messages import (
    I64,
    Capabilities,
    Constraints,
    Container,
    EnvironmentVar,
    ExecCommand,
    FileCommand,
    FsmapDescriptor,
    IPAddress,
    KillCommand,
    NetworkIface,
    Pod,
    Process,
    ProcessAsyncEvent,
    PsCommand,
    RemoveCommand,
    Rlimit,
    Route,
    RouteList,
    SignalCommand,
    SystemMountsInfo,
    VolumeDescriptor,
    WindowSize,
    WindowSizeMessage,
)

__all__ = ["MessageError", "decode_message", "encode_message"]

T = TypeVar("T", bound=msgspec.Struct)


class MessageError(RemoteProtocolError):
    """A ctl payload is not valid JSON for the expected body. ``str()`` names what was wrong."""


# Go's encoder escapes these inside strings (HTML safety); they never occur outside strings.
_GO_ESCAPES: Final = (
    (b"<", b"\\u003c"),
    (b">", b"\\u003e"),
    (b"&", b"\\u0026"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)

_CC_ENCODER: Final = msgspec.json.Encoder(order="deterministic")  # Go sorts map keys
_HYPER_ENCODER: Final = msgspec.json.Encoder()  # shapers build dicts in key order already


# Go before 1.22 (cc-proxy's era) writes \b and \f as \u0008 and \u000c; msgspec uses the short
# forms. Escapes are rewritten pairwise so that an escaped backslash before a "b" is left alone.
_SHORT_ESCAPE: Final = re.compile(rb"\\(.)")
_GO_SHORT_ESCAPES: Final = {b"b": b"\\u0008", b"f": b"\\u000c"}


def _go_short_escape(match: re.Match[bytes]) -> bytes:
    return _GO_SHORT_ESCAPES.get(match.group(1), match.group(0))


_GO_ESCAPE_BYTES: Final = b"<>&\xe2\\"
"""Bytes that start something :func:`_go_escape` rewrites (0xE2 starts U+2028 and U+2029)."""


def _go_escape(data: bytes) -> bytes:
    if len(data.translate(None, _GO_ESCAPE_BYTES)) == len(data):
        return data  # the common case: nothing to rewrite (checked in one pass)
    for raw, escaped in _GO_ESCAPES:
        if raw in data:
            data = data.replace(raw, escaped)
    if b"\\b" in data or b"\\f" in data:
        data = _SHORT_ESCAPE.sub(_go_short_escape, data)
    return data


# ---------------------------------------------------------------------------------------------
# HYPER encoding: one shaper per body whose hyperhq key set differs from CC.


def _h_process(p: Process) -> dict[str, Any]:
    d: dict[str, Any] = {"id": p.id or str(p.stdio)}
    if p.user:
        d["user"] = p.user
    if p.group:
        d["group"] = p.group
    if p.additional_groups:
        d["additionalGroups"] = p.additional_groups
    d["terminal"] = p.terminal
    if p.stdio:
        d["stdio"] = p.stdio
    if p.stderr:
        d["stderr"] = p.stderr
    if p.args is not None:
        d["args"] = p.args
    if p.envs:
        d["envs"] = p.envs
    d["workdir"] = p.workdir
    return d


def _h_fsmap(m: FsmapDescriptor) -> dict[str, Any]:
    return {
        "source": m.source,
        "path": m.path,
        "readOnly": m.read_only,
        "dockerVolume": m.docker_volume,
    }


def _h_container(c: Container) -> dict[str, Any]:
    d: dict[str, Any] = {"id": c.id, "rootfs": c.rootfs}
    if c.fstype:
        d["fstype"] = c.fstype
    d["image"] = c.image
    if c.volumes:
        d["volumes"] = c.volumes
    if c.fsmap:
        d["fsmap"] = [_h_fsmap(m) for m in c.fsmap]
    if c.sysctl:
        d["sysctl"] = dict(sorted(c.sysctl.items()))
    if c.process is not None:
        d["process"] = _h_process(c.process)
    if c.restart_policy:
        d["restartPolicy"] = c.restart_policy
    if c.initialize:
        d["initialize"] = True
    return d


def _h_iface(i: NetworkIface) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if i.device:
        d["device"] = i.device
    if i.new_device_name:
        d["newDeviceName"] = i.new_device_name
    if i.ip_addresses is not None:
        d["ipAddresses"] = i.ip_addresses
    if i.mtu:
        d["mtu"] = i.mtu
    return d


def _h_pod(p: Pod) -> dict[str, Any]:
    d: dict[str, Any] = {"hostname": p.hostname}
    if p.containers:
        d["containers"] = [_h_container(c) for c in p.containers]
    if p.interfaces:
        d["interfaces"] = [_h_iface(i) for i in p.interfaces]
    if p.dns:
        d["dns"] = p.dns
    if p.routes:
        d["routes"] = p.routes
    d["shareDir"] = p.share_dir
    return d


def _h_exec(e: ExecCommand) -> dict[str, Any]:
    return {"container": e.container, "process": _h_process(e.process)}


def _h_kill(k: KillCommand) -> dict[str, Any]:
    return {"container": k.container, "signal": k.signal}


def _h_route_list(r: RouteList) -> dict[str, Any]:
    return {} if r.routes is None else {"routes": r.routes}


def _h_event(e: ProcessAsyncEvent) -> dict[str, Any]:
    d: dict[str, Any] = {"container": e.container, "process": e.process, "event": e.event}
    if e.info:
        d["info"] = e.info
    d["status"] = e.status
    return d


_HYPER_SHAPERS: Final[dict[type[Any], Callable[[Any], dict[str, Any]]]] = {
    Process: _h_process,
    FsmapDescriptor: _h_fsmap,
    Container: _h_container,
    NetworkIface: _h_iface,
    Pod: _h_pod,
    ExecCommand: _h_exec,
    KillCommand: _h_kill,
    RouteList: _h_route_list,
    ProcessAsyncEvent: _h_event,
}
# Same keys in both dialects: encoded as they are.
_HYPER_AS_IS: Final = frozenset(
    {
        EnvironmentVar,
        IPAddress,
        Route,
        VolumeDescriptor,
        RemoveCommand,
        FileCommand,
        SignalCommand,
        WindowSizeMessage,
    }
)
_HYPER_NO_FORM: Final = {
    WindowSize: "hyperhq takes WINSIZE as WindowSizeMessage {container,process,row,column}",
    PsCommand: "hyperhq has no PSCONTAINER command",
    Rlimit: "hyperhq does not accept rlimits",
    Capabilities: "hyperhq does not accept capabilities",
    SystemMountsInfo: "hyperhq does not accept systemMountsInfo",
    Constraints: "hyperhq does not accept constraints",
}


def encode_message(msg: msgspec.Struct, dialect: Dialect = CC) -> bytes:
    """Return the JSON bytes of ``msg`` as ``dialect``'s host library would write them.

    Raises LocalProtocolError when the body has no form in the dialect or cannot be encoded.
    Value ranges are not checked here (the decoders check them).
    """
    try:
        if dialect.name == "hyper":
            kind = type(msg)
            shaper = _HYPER_SHAPERS.get(kind)
            if shaper is not None:
                data = _HYPER_ENCODER.encode(shaper(msg))
            elif kind in _HYPER_AS_IS:
                data = _HYPER_ENCODER.encode(msg)
            elif kind in _HYPER_NO_FORM:
                raise LocalProtocolError(
                    f"{kind.__name__} cannot be sent to hyperhq: {_HYPER_NO_FORM[kind]}"
                )
            else:
                raise LocalProtocolError(f"{kind.__name__} is not a hyperstart message")
        else:
            data = _CC_ENCODER.encode(msg)
    except (msgspec.EncodeError, TypeError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode {type(msg).__name__}: {exc}") from None
    return _go_escape(data)


# ---------------------------------------------------------------------------------------------
# Decoding. CC: the Structs themselves (unknown keys ignored). HYPER: the same payload is first
# validated against a strict variant holding exactly the keys hyperstart accepts.


def _strict(
    cls: type[msgspec.Struct],
    *,
    drop: Iterable[str] = (),
    types: dict[str, Any] | None = None,
    extra: Iterable[tuple[str, Any]] = (),
) -> type[msgspec.Struct]:
    """A Struct with ``cls``'s JSON keys (minus ``drop``, plus ``extra``) refusing any other."""
    dropped = frozenset(drop)
    overrides = types or {}
    fields: list[tuple[str, Any, Any]] = [
        (f.encode_name, overrides.get(f.encode_name, f.type), None)
        for f in msgspec.structs.fields(cls)
        if f.encode_name not in dropped
    ]
    fields.extend((name, tp, None) for name, tp in extra)
    return msgspec.defstruct(f"Strict{cls.__name__}", fields, forbid_unknown_fields=True)


def _list_of(tp: Any) -> Any:
    return list.__class_getitem__(tp)


def _optional(tp: Any) -> Any:
    return tp | None


_S_ENV: Final = _strict(EnvironmentVar)
_S_IP: Final = _strict(IPAddress)
_S_ROUTE: Final = _strict(Route)
_S_VOLUME: Final = _strict(VolumeDescriptor)
_S_FSMAP: Final = _strict(FsmapDescriptor, drop=("absolutePath", "scsiAddr"))
_S_PROCESS: Final = _strict(
    Process,
    drop=("rlimits", "noNewPrivileges", "capabilities"),
    types={"envs": _list_of(_S_ENV)},
)
_S_PORT: Final = msgspec.defstruct(
    "StrictPort",
    [("hostPort", I64, None), ("containerPort", I64, None), ("protocol", str, None)],
    forbid_unknown_fields=True,
)
_S_CONTAINER: Final = _strict(
    Container,
    drop=("scsiAddr", "systemMountsInfo", "constraints"),
    types={
        "volumes": _list_of(_S_VOLUME),
        "fsmap": _list_of(_S_FSMAP),
        "process": _optional(_S_PROCESS),
    },
    extra=(("addr", str), ("readOnly", bool), ("ports", _optional(_list_of(_S_PORT)))),
)
_S_IFACE: Final = _strict(
    NetworkIface,
    drop=("macAddr",),
    types={"ipAddresses": _optional(_list_of(_S_IP))},
    extra=(("ipAddress", str), ("netMask", str)),
)
_S_WHITELISTS: Final = msgspec.defstruct(
    "StrictWhiteLists",
    [
        ("internalNetworks", _optional(list[str]), None),
        ("externalNetworks", _optional(list[str]), None),
    ],
    forbid_unknown_fields=True,
)
_S_POD: Final = _strict(
    Pod,
    types={
        "containers": _list_of(_S_CONTAINER),
        "interfaces": _list_of(_S_IFACE),
        "routes": _list_of(_S_ROUTE),
    },
    extra=(
        ("dnsSearch", list[str]),
        ("dnsOptions", list[str]),
        ("restartPolicy", str),
        ("portmappingWhiteLists", _S_WHITELISTS),
    ),
)

_STRICT_TYPES: Final[dict[type[Any], type[msgspec.Struct]]] = {
    EnvironmentVar: _S_ENV,
    IPAddress: _S_IP,
    Route: _S_ROUTE,
    VolumeDescriptor: _S_VOLUME,
    FsmapDescriptor: _S_FSMAP,
    Process: _S_PROCESS,
    Container: _S_CONTAINER,
    NetworkIface: _S_IFACE,
    Pod: _S_POD,
    ExecCommand: _strict(ExecCommand, types={"process": _S_PROCESS}),
    RouteList: _strict(RouteList, types={"routes": _optional(_list_of(_S_ROUTE))}),
    RemoveCommand: _strict(RemoveCommand),
    FileCommand: _strict(FileCommand),
    SignalCommand: _strict(SignalCommand),
    WindowSizeMessage: _strict(WindowSizeMessage),
    ProcessAsyncEvent: _strict(ProcessAsyncEvent),
    # Bodies hyperhq has no form for: strict on their own keys.
    WindowSize: _strict(WindowSize),
    PsCommand: _strict(PsCommand),
    Rlimit: _strict(Rlimit),
    Capabilities: _strict(Capabilities),
    SystemMountsInfo: _strict(SystemMountsInfo),
    Constraints: _strict(Constraints),
    # KillCommand: absent on purpose (parson ignores unknown keys).
}
_STRICT_DECODERS: Final[dict[type[Any], msgspec.json.Decoder[Any]]] = {
    cls: msgspec.json.Decoder(strict_type) for cls, strict_type in _STRICT_TYPES.items()
}
_LENIENT_TYPES: Final[tuple[type[Any], ...]] = (*_STRICT_TYPES, KillCommand)
_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {
    cls: msgspec.json.Decoder(cls) for cls in _LENIENT_TYPES
}


def decode_message(cls: type[T], payload: bytes, dialect: Dialect = CC) -> T:
    """Decode ``payload`` as a ``cls`` body sent in ``dialect``.

    Raises MessageError (a RemoteProtocolError) naming the fault: malformed JSON, a wrong type
    or range, or (HYPER) a key hyperstart does not accept.
    """
    decoder = _DECODERS.get(cls)
    if decoder is None:
        decoder = _DECODERS[cls] = msgspec.json.Decoder(cls)
    try:
        if dialect.name == "hyper":
            strict = _STRICT_DECODERS.get(cls)
            if strict is not None:
                strict.decode(payload)
        result: T = decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise MessageError(f"invalid {cls.__name__} body: {exc}") from None
    except jsonerrors.DECODE_ERRORS as exc:
        text = jsonerrors.describe(payload, exc)
        raise MessageError(f"malformed {cls.__name__} body: {text}") from None
    return result
