"""Relocation of newcontainer/execcmd (unit level): seqs filled in, Go's decoding leniency,
Go's re-encoding for the CC dialect, hyperhq's key set for the hyper dialect."""

from __future__ import annotations

import msgspec
import pytest

from hyperd.proxy.gojson import syntax_error
from hyperd.proxy.relocate import relocate
from hyperd.proxy.texts import CommandError
from protocol.hyperstart import CC, HYPER


def test_go_leniency_key_case_and_nulls() -> None:
    """Go matches keys case-insensitively and treats null as absent; unknown keys vanish."""
    data = (
        b'{"ID":"c1","Process":{"Terminal":true,"user":null,"args":null,"Args":["sh"],'
        b'"stdio":null,"bogus":1},"constraints":{"cpuquota":5,"CPUShares":1024},"x":null}'
    )
    out = relocate("newcontainer", data, 7, CC)
    body = msgspec.json.decode(out.payload)
    assert body["id"] == "c1" and out.container_id == "c1" and out.terminal
    assert body["process"]["args"] == ["sh"]
    assert (body["process"]["stdio"], "stderr" in body["process"]) == (7, False)
    assert "bogus" not in body["process"] and "x" not in body
    # cc-proxy 3.0.23's vendored Constraints has no CPUShares
    assert body["constraints"] == {"CPUQuota": 5, "CPUPeriod": 0}


def test_go_encoding_details() -> None:
    """README item 4: <>& escaped, \\u00e9 as raw UTF-8, sysctl keys sorted, empty omitempty
    lists dropped, non-omitempty zero values explicit."""
    data = (
        b'{"id":"c<1>&","sysctl":{"b":"1","a":"2"},"volumes":[],'
        b'"process":{"envs":[{"env":"G","value":"h\\u00e9llo"}],"additionalGroups":[]}}'
    )
    payload = relocate("newcontainer", data, 3, CC).payload
    assert payload.startswith(b'{"id":"c\\u003c1\\u003e\\u0026","rootfs":"","image":""')
    assert b'"sysctl":{"a":"2","b":"1"}' in payload
    assert "héllo".encode() in payload
    assert b"volumes" not in payload and b"additionalGroups" not in payload
    assert b'"process":{"terminal":false,"stdio":3,"stderr":4,"args":null,' in payload
    assert b'"restartPolicy":"","initialize":false' in payload


def test_hyper_form() -> None:
    data = b'{"container":"c1","process":{"args":["ls"],"capabilities":{"bounding":[]}}}'
    out = relocate("execcmd", data, 5, HYPER)
    body = msgspec.json.decode(out.payload)
    assert body["process"]["id"] == "5" == out.process_id
    assert "capabilities" not in body["process"]
    assert (body["process"]["stdio"], body["process"]["stderr"]) == (5, 6)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"id":"c1","process":{"stdio":7}}', "expected process.Stdio to be 0, got 7"),
        (b'{"id":"c1","process":{"stderr":8}}', "expected process.Stderr to be 0, got 8"),
        (b'{"id":"c1"}', "newcontainer data has no process"),
        (b'{"id":"c1","process":null}', "newcontainer data has no process"),
        (b"", "unexpected end of JSON input"),
        (b'{"id":', "unexpected end of JSON input"),
    ],
)
def test_refusals(data: bytes, message: str) -> None:
    with pytest.raises(CommandError) as info:
        relocate("newcontainer", data, 3, CC)
    assert info.value.message == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"{}", None),
        (b" [1, 2.5e3, -0, true, null] ", None),
        (b"{not json}", "invalid character 'n' looking for beginning of object key string"),
        (b'{"a":1,}', "invalid character '}' looking for beginning of object key string"),
        (b'{"a" 1}', "invalid character '1' after object key"),
        (b'{"a":1 "b"}', "invalid character '\"' after object key:value pair"),
        (b"[1 2]", "invalid character '2' after array element"),
        (b"01", "invalid character '1' after top-level value"),
        (b"1.", "unexpected end of JSON input"),
        (b"1.x", "invalid character 'x' after decimal point in numeric literal"),
        (b"1e+", "unexpected end of JSON input"),
        (b"-x", "invalid character 'x' in numeric literal"),
        (b"nul", "unexpected end of JSON input"),
        (b"nulx", "invalid character 'x' in literal null (expecting 'l')"),
        (b'"a\\q"', "invalid character 'q' in string escape code"),
        (b'"\\u12x4"', "invalid character 'x' in \\u hexadecimal character escape"),
        (b'"a\nb"', "invalid character '\\n' in string literal"),
        (b"'", "invalid character '\\'' looking for beginning of value"),
    ],
)
def test_go_syntax_errors(text: bytes, message: str | None) -> None:
    """Go's scanner texts (encoding/json scanner.go)."""
    assert syntax_error(text) == message
