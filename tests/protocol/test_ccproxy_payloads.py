"""Payload Structs of protocol.ccproxy: exact Go encoding, Go's lenient decoding, errors."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import LocalProtocolError, RemoteProtocolError
from protocol.ccproxy import (
    PAYLOAD_TYPES,
    AttachVM,
    ConnectShim,
    ErrorResponse,
    Hyper,
    IOResponse,
    LogEntry,
    PayloadError,
    ProcessExitNotice,
    RegisterVM,
    Signal,
    UnregisterVM,
    VMResponse,
    decode_payload,
    encode_payload,
)

TOKEN = "pF56IaDpuax6hihJ5PneB8JypqmOvjkqY-wKGVYqgIM="

# (object, exact JSON Go's encoding/json produces for it)
ENCODINGS: list[tuple[msgspec.Struct, bytes]] = [
    (
        RegisterVM("pod1", "/run/ctl", "/run/tty"),
        b'{"containerId":"pod1","ctlSerial":"/run/ctl","ioSerial":"/run/tty"}',
    ),
    (
        RegisterVM("pod1", "/c", "/t", console="/con", numIOStreams=2),
        b'{"containerId":"pod1","ctlSerial":"/c","ioSerial":"/t","console":"/con",'
        b'"numIOStreams":2}',
    ),
    (RegisterVM("", "", ""), b'{"containerId":"","ctlSerial":"","ioSerial":""}'),
    (UnregisterVM("e1"), b'{"containerId":"e1"}'),
    (AttachVM("e1"), b'{"containerId":"e1"}'),
    (AttachVM("e1", 4), b'{"containerId":"e1","numIOStreams":4}'),
    (
        VMResponse(IOResponse("unix:///run/proxy.sock", None)),
        b'{"io":{"URL":"unix:///run/proxy.sock","tokens":null}}',
    ),
    (
        VMResponse(IOResponse("unix:///p", [TOKEN])),
        b'{"io":{"URL":"unix:///p","tokens":["' + TOKEN.encode() + b'"]}}',
    ),
    (VMResponse(IOResponse("", [])), b'{"io":{"URL":"","tokens":[]}}'),
    (Hyper("ping"), b'{"hyperName":"ping","tokens":null}'),
    (Hyper("ping", []), b'{"hyperName":"ping","tokens":[]}'),
    (
        Hyper("startpod", None, msgspec.Raw(b'{"hostname":"p"}')),
        b'{"hyperName":"startpod","tokens":null,"data":{"hostname":"p"}}',
    ),
    (
        Hyper("newcontainer", [TOKEN], msgspec.Raw(b"null")),
        b'{"hyperName":"newcontainer","tokens":["' + TOKEN.encode() + b'"],"data":null}',
    ),
    (ConnectShim(TOKEN), b'{"token":"' + TOKEN.encode() + b'"}'),
    (Signal(15), b'{"signalNumber":15}'),
    (Signal(0), b'{"signalNumber":0}'),
    (Signal(28, columns=80, rows=24), b'{"signalNumber":28,"columns":80,"rows":24}'),
    (Signal(28, columns=80), b'{"signalNumber":28,"columns":80}'),
    (ErrorResponse("unknown containerID: foo"), b'{"msg":"unknown containerID: foo"}'),
    (ErrorResponse(""), b'{"msg":""}'),
    (
        LogEntry(source="runtime", containerId="e1", level="info", msg="hello"),
        b'{"source":"runtime","containerId":"e1","level":"info","msg":"hello"}',
    ),
    (
        LogEntry(source="shim", level="warn", msg="x"),
        b'{"source":"shim","level":"warn","msg":"x"}',
    ),
    # Go escapes HTML characters and the JS line separators, keeps other UTF-8 raw
    (
        LogEntry(source="shim", level="error", msg="a<b>&c\u2028\u2029 é \x01\n"),
        b'{"source":"shim","level":"error","msg":"a\\u003cb\\u003e\\u0026c\\u2028\\u2029'
        b' \xc3\xa9 \\u0001\\n"}',
    ),
    # ... but Hyper.data is raw JSON forwarded verbatim
    (
        Hyper("x&y", None, msgspec.Raw(b'{"args":["a && b > c"]}')),
        b'{"hyperName":"x\\u0026y","tokens":null,"data":{"args":["a && b > c"]}}',
    ),
]
ENCODING_IDS = [f"{type(o).__name__}-{i}" for i, (o, _) in enumerate(ENCODINGS)]


@pytest.mark.parametrize(("obj", "wire"), ENCODINGS, ids=ENCODING_IDS)
def test_encode_is_byte_exact(obj: msgspec.Struct, wire: bytes) -> None:
    assert encode_payload(obj) == wire


@pytest.mark.parametrize(("obj", "wire"), ENCODINGS, ids=ENCODING_IDS)
def test_decode_gives_back_the_object(obj: msgspec.Struct, wire: bytes) -> None:
    assert decode_payload(type(obj), wire) == obj


# (class, payload, expected): what Go's decoder makes of unusual but valid input
LENIENT = [
    (AttachVM, b'{"CONTAINERID":"a","NumIoStreams":3}', AttachVM("a", 3)),
    (AttachVM, b'{"containerid":"a","numIOStreams":1,"extra":[1,{"x":2}]}', AttachVM("a", 1)),
    (AttachVM, b'{"containerId":"a","numIOStreams":null}', AttachVM("a")),
    (AttachVM, b'{"containerId":null}', AttachVM("")),
    (AttachVM, b"{}", AttachVM("")),
    (AttachVM, b"null", AttachVM("")),
    (AttachVM, b' \n{ "containerId" : "a" }\t', AttachVM("a")),
    (AttachVM, b'{"containerId":"a","containerId":"b"}', AttachVM("b")),
    (AttachVM, b'{"containerId":"\\u00e9\\u0026"}', AttachVM("é&")),
    (RegisterVM, b'{"ctlSerial":"/c","ioSerial":"/t"}', RegisterVM("", "/c", "/t")),
    (VMResponse, b'{"io":{"url":"unix:///p","tokens":null}}', VMResponse(IOResponse("unix:///p"))),
    (VMResponse, b'{"IO":{"URL":"u","Tokens":["a"]}}', VMResponse(IOResponse("u", ["a"]))),
    (VMResponse, b"{}", VMResponse(IOResponse(""))),
    (VMResponse, b'{"io":null}', VMResponse(IOResponse(""))),
    (Hyper, b'{"hyperName":"ping"}', Hyper("ping")),
    (Hyper, b'{"HYPERNAME":"ping","tokens":[]}', Hyper("ping", [])),
    (Hyper, b'{"hyperName":"p","data":null}', Hyper("p", None, msgspec.Raw(b"null"))),
    (Hyper, b'{"hyperName":"p","Data":"s"}', Hyper("p", None, msgspec.Raw(b'"s"'))),
    (
        Hyper,
        b'{"hyperName":"p","data": { "a" : [ 1 ] } }',
        Hyper("p", None, msgspec.Raw(b'{ "a" : [ 1 ] }')),
    ),
    (Signal, b'{"SignalNumber":28,"Columns":1,"ROWS":2}', Signal(28, 1, 2)),
    (ErrorResponse, b'{"Msg":"boom"}', ErrorResponse("boom")),
    (ErrorResponse, b"{}", ErrorResponse("")),
    (
        LogEntry,
        b'{"Source":"shim","LEVEL":"info","msg":"m"}',
        LogEntry(source="shim", level="info", msg="m"),
    ),
    (ConnectShim, b'{"Token":"t"}', ConnectShim("t")),
    (UnregisterVM, b'{"ContainerID":"x"}', UnregisterVM("x")),
]


@pytest.mark.parametrize(("cls", "payload", "expected"), LENIENT)
def test_decode_is_as_lenient_as_go(
    cls: type[msgspec.Struct], payload: bytes, expected: Any
) -> None:
    assert decode_payload(cls, payload) == expected


def test_raw_data_keeps_its_exact_bytes() -> None:
    hyper = decode_payload(Hyper, b'{"data":  [1, 2,\n 3] ,"hyperName":"x"}')
    assert isinstance(hyper.data, msgspec.Raw)
    assert bytes(hyper.data) == b"[1, 2,\n 3]"
    assert encode_payload(hyper) == b'{"hyperName":"x","tokens":null,"data":[1, 2,\n 3]}'


# (class, payload, words expected in the message)
INVALID = [
    (AttachVM, b"", "invalid AttachVM payload: empty"),
    (AttachVM, b'{"containerId":', "truncated"),
    (AttachVM, b"{", "truncated"),
    (AttachVM, b'{"containerId":42}', r"Expected `str`, got `int` - at `\$.containerId`"),
    (AttachVM, b'{"CONTAINERID":42}', r"Expected `str`, got `int` - at `\$.containerId`"),
    (AttachVM, b'{"containerId":"a","numIOStreams":"3"}', "Expected `int`, got `str`"),
    (AttachVM, b'{"containerId":"a","numIOStreams":1.5}', "Expected `int`, got `float`"),
    (AttachVM, b'{"containerId":"\xff"}', "not valid UTF-8"),
    (AttachVM, b'{"containerId":"\xed\xa0\x80"}', "invalid AttachVM payload"),
    (AttachVM, b"[]", "Expected `object | null`, got `array`"),
    (AttachVM, b'"a"', "Expected `object | null`, got `str`"),
    (AttachVM, b"{}x", "invalid AttachVM payload"),
    (AttachVM, b"\x00", "malformed"),
    (Hyper, b'{"hyperName":"ping","tokens":null,"data":{not json}}', "malformed"),
    (Hyper, b'{"hyperName":"ping","tokens":"t"}', "Expected `array | null`, got `str`"),
    (Hyper, b'{"hyperName":"ping","tokens":[1]}', r"at `\$.tokens\[0\]`"),
    (VMResponse, b'{"io":5}', "invalid VMResponse payload"),
    (VMResponse, b'{"io":{"URL":5}}', "Expected `str`, got `int`"),
    (VMResponse, b'{"io":{"url":[]}}', "Expected `str`, got `array`"),
    (Signal, b'{"signalNumber":true}', "Expected `int`, got `bool`"),
]


@pytest.mark.parametrize(("cls", "payload", "fault"), INVALID)
def test_decode_failures_are_payload_errors(
    cls: type[msgspec.Struct], payload: bytes, fault: str
) -> None:
    with pytest.raises(PayloadError, match=fault) as info:
        decode_payload(cls, payload)
    assert isinstance(info.value, RemoteProtocolError)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_unencodable_string_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="cannot encode ConnectShim"):
        encode_payload(ConnectShim("\udc80"))


def test_payload_types_lists_every_struct() -> None:
    assert set(PAYLOAD_TYPES) == {
        RegisterVM, UnregisterVM, AttachVM, IOResponse, VMResponse, Hyper, ConnectShim, Signal,
        ErrorResponse, LogEntry, ProcessExitNotice,
    }  # fmt: skip


# --- property tests -------------------------------------------------------------------------

texts = st.text(max_size=12)
ints = st.integers(-(2**63), 2**63 - 1)
token_lists = st.none() | st.lists(texts, max_size=3)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
raw_values = json_values.map(lambda v: msgspec.Raw(msgspec.json.encode(v)))

PAYLOADS: dict[type[msgspec.Struct], st.SearchStrategy[Any]] = {
    RegisterVM: st.builds(
        RegisterVM,
        texts,
        texts,
        texts,
        console=texts,
        numIOStreams=ints,
        exitNotifications=st.booleans(),
    ),
    UnregisterVM: st.builds(UnregisterVM, texts),
    AttachVM: st.builds(AttachVM, texts, ints, st.booleans()),
    IOResponse: st.builds(IOResponse, texts, token_lists),
    VMResponse: st.builds(VMResponse, st.builds(IOResponse, texts, token_lists), st.booleans()),
    Hyper: st.builds(Hyper, texts, token_lists, st.just(msgspec.UNSET) | raw_values),
    ConnectShim: st.builds(ConnectShim, texts),
    Signal: st.builds(Signal, ints, ints, ints),
    ErrorResponse: st.builds(ErrorResponse, texts),
    LogEntry: st.builds(LogEntry, source=texts, containerId=texts, level=texts, msg=texts),
    ProcessExitNotice: st.builds(
        ProcessExitNotice,
        containerId=texts,
        token=texts,
        container=texts,
        process=texts,
        status=ints,
        backlog=st.booleans(),
    ),
}


def test_strategies_cover_every_payload_type() -> None:
    assert set(PAYLOADS) == set(PAYLOAD_TYPES)


@settings(max_examples=300)
@given(st.sampled_from(PAYLOAD_TYPES).flatmap(lambda cls: PAYLOADS[cls]))
def test_decode_of_encode_is_identity(obj: msgspec.Struct) -> None:
    wire = encode_payload(obj)
    assert decode_payload(type(obj), wire) == obj
    assert encode_payload(decode_payload(type(obj), wire)) == wire


@settings(max_examples=300)
@given(st.sampled_from(PAYLOAD_TYPES), st.binary(max_size=80))
def test_any_bytes_decode_or_raise_remote_error(cls: type[msgspec.Struct], data: bytes) -> None:
    try:
        assert isinstance(decode_payload(cls, data), cls)
    except RemoteProtocolError:
        pass


def key_variants(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper(), name.swapcase(), name + "x"])


ALL_KEYS = sorted({f for cls in PAYLOAD_TYPES for f in cls.__struct_fields__})


@settings(max_examples=300)
@given(
    st.sampled_from(PAYLOAD_TYPES),
    st.dictionaries(st.sampled_from(ALL_KEYS).flatmap(key_variants), json_values, max_size=5),
)
def test_any_json_object_decodes_or_raises_remote_error(
    cls: type[msgspec.Struct], obj: dict[str, Any]
) -> None:
    try:
        decoded = decode_payload(cls, msgspec.json.encode(obj))
    except RemoteProtocolError:
        return
    assert isinstance(decoded, cls)
    assert decode_payload(cls, encode_payload(decoded)) == decoded
