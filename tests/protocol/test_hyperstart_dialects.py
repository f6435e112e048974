"""Code tables of the CC and hyperhq dialects: the codes 23/24 never mix."""

from __future__ import annotations

import pytest

from protocol import LocalProtocolError
from protocol.hyperstart import (
    CC,
    DIALECTS,
    HYPER,
    HYPER_API_VERSION_MIN,
    Code,
    Dialect,
    UnknownCommand,
)

# virtcontainers CodeList as vendored by cc-proxy 3.0.23 (ccproxy spec §5.5)
CC_CODELIST = {
    "version": 0,
    "startpod": 1,
    "destroypod": 4,
    "execcmd": 6,
    "ready": 8,
    "ack": 9,
    "error": 10,
    "winsize": 11,
    "ping": 12,
    "next": 14,
    "writefile": 15,
    "readfile": 16,
    "newcontainer": 17,
    "killcontainer": 18,
    "onlinecpumem": 19,
    "setupinterface": 20,
    "setuproute": 21,
    "removecontainer": 22,
    "pscontainer": 23,
}


def test_common_codes_are_the_spec_table() -> None:
    assert [(c.name, int(c)) for c in Code] == [
        ("VERSION", 0),
        ("STARTPOD", 1),
        ("GETPOD", 2),
        ("STOPPOD", 3),
        ("DESTROYPOD", 4),
        ("RESTARTCONTAINER", 5),
        ("EXECCMD", 6),
        ("CMDFINISHED", 7),
        ("READY", 8),
        ("ACK", 9),
        ("ERROR", 10),
        ("WINSIZE", 11),
        ("PING", 12),
        ("PODFINISHED", 13),
        ("NEXT", 14),
        ("WRITEFILE", 15),
        ("READFILE", 16),
        ("NEWCONTAINER", 17),
        ("KILLCONTAINER", 18),
        ("ONLINECPUMEM", 19),
        ("SETUPINTERFACE", 20),
        ("SETUPROUTE", 21),
        ("REMOVECONTAINER", 22),
    ]


def test_cc_names_are_the_codelist_plus_kata_aliases() -> None:
    assert dict(CC.names) == {**CC_CODELIST, "startsandbox": 1, "destroysandbox": 4}


@pytest.mark.parametrize(("name", "code"), sorted(CC_CODELIST.items()))
def test_cc_code_for(name: str, code: int) -> None:
    assert CC.code_for(name) == code


def test_codes_23_and_24_never_mix() -> None:
    assert (CC.ps_container, CC.process_async_event, CC.signal_process) == (23, 24, None)
    assert (HYPER.ps_container, HYPER.process_async_event, HYPER.signal_process) == (None, 23, 24)
    assert CC.name_of(23) == "pscontainer"
    assert HYPER.name_of(23) == "processasyncevent"
    assert CC.name_of(24) == "processasyncevent"
    assert HYPER.name_of(24) == "signalprocess"
    assert HYPER.name_of(25) == "deleteinterface"
    assert CC.name_of(25) == "unknown(25)"
    assert "pscontainer" not in HYPER.names
    assert "signalprocess" not in CC.names
    assert "processasyncevent" not in CC.names  # no string name in CodeList
    assert HYPER.code_for("signalprocess") == 24


@pytest.mark.parametrize(("dialect", "name"), [(HYPER, "pscontainer"), (CC, "bogus"), (CC, "")])
def test_unknown_command_names(dialect: Dialect, name: str) -> None:
    with pytest.raises(UnknownCommand) as info:
        dialect.code_for(name)
    assert str(info.value) == f"unknown command '{name}'"
    assert isinstance(info.value, LocalProtocolError)


@pytest.mark.parametrize("dialect", [CC, HYPER])
def test_common_codes_have_the_same_name_in_both(dialect: Dialect) -> None:
    for code in Code:
        assert dialect.name_of(code) == code.name.lower()
        if code.name.lower() in CC_CODELIST:
            assert dialect.code_for(code.name.lower()) == code


def test_kata_aliases_in_both() -> None:
    for dialect in (CC, HYPER):
        assert dialect.code_for("startsandbox") == Code.STARTPOD
        assert dialect.code_for("destroysandbox") == Code.DESTROYPOD


def test_dialect_registry_and_version() -> None:
    assert DIALECTS == {"cc": CC, "hyper": HYPER}
    assert (CC.name, HYPER.name) == ("cc", "hyper")
    assert HYPER_API_VERSION_MIN == 4243


def test_unknown_code_name() -> None:
    assert CC.name_of(99) == "unknown(99)"
    assert HYPER.name_of(1 << 31) == f"unknown({1 << 31})"
