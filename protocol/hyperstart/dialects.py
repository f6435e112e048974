"""Command codes of the hyperstart ctl channel and the two dialects that number them.

Codes 0..22 mean the same thing everywhere (:class:`Code`). Codes 23 and 24 do not:

- **CC** (virtcontainers host library, cc-agent, cc-proxy): 23 = PSCONTAINER (host -> agent),
  24 = PROCESSASYNCEVENT (agent -> host; never emitted by cc-agent).
- **HYPER** (hyperhq/hyperstart >= v0.8, runv): 23 = PROCESSASYNCEVENT (agent -> host),
  24 = SIGNALPROCESS (host -> agent), 25 = DELETEINTERFACE (v1.1.0).

A :class:`Dialect` carries its own name table and the numbers of the dialect-specific codes, so
code that asks ``dialect.process_async_event`` can never pick the other dialect's number.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import Final

from protocol.errors import LocalProtocolError

__all__ = [
    "CC",
    "DIALECTS",
    "HYPER",
    "HYPER_API_VERSION_MIN",
    "Code",
    "Dialect",
    "UnknownCommand",
]

HYPER_API_VERSION_MIN: Final = 4243
"""Oldest hyperhq APIVERSION with PROCESSASYNCEVENT/SIGNALPROCESS (4242 is the legacy H07 API)."""


class Code(IntEnum):
    """Codes shared by every dialect (hyperstart ``src/api.h``, virtcontainers ``*Code``)."""

    VERSION = 0
    STARTPOD = 1
    GETPOD = 2
    STOPPOD = 3
    DESTROYPOD = 4
    RESTARTCONTAINER = 5
    EXECCMD = 6
    CMDFINISHED = 7
    READY = 8
    ACK = 9
    ERROR = 10
    WINSIZE = 11
    PING = 12
    PODFINISHED = 13
    NEXT = 14
    WRITEFILE = 15
    READFILE = 16
    NEWCONTAINER = 17
    KILLCONTAINER = 18
    ONLINECPUMEM = 19
    SETUPINTERFACE = 20
    SETUPROUTE = 21
    REMOVECONTAINER = 22


class UnknownCommand(LocalProtocolError):
    """A command name the dialect does not know. ``str()`` is ``unknown command '<name>'``."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown command '{name}'")
        self.name = name


@dataclass(frozen=True, slots=True)
class Dialect:
    """One numbering of the ctl codes.

    ``names`` maps the command names a host may ask for (cc-proxy ``hyperName``) to codes.
    ``display_names`` names every code the dialect defines, for logs and recordings.
    """

    name: str
    names: Mapping[str, int]
    ps_container: int | None
    process_async_event: int
    signal_process: int | None
    delete_interface: int | None = None
    display_names: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))

    def code_for(self, name: str) -> int:
        """Return the code of command ``name``; raise :class:`UnknownCommand` if there is none."""
        try:
            return self.names[name]
        except KeyError:
            raise UnknownCommand(name) from None

    def name_of(self, code: int) -> str:
        """Return the lower-case name of ``code`` in this dialect, ``"unknown(<code>)"`` if none."""
        return self.display_names.get(code) or f"unknown({code})"


# Names in virtcontainers' CodeList (cc-proxy 3.0.23) -- the hyperName values a CC host sends.
_COMMON_NAMES: Final = {
    "version": Code.VERSION,
    "startpod": Code.STARTPOD,
    "destroypod": Code.DESTROYPOD,
    "execcmd": Code.EXECCMD,
    "ready": Code.READY,
    "ack": Code.ACK,
    "error": Code.ERROR,
    "winsize": Code.WINSIZE,
    "ping": Code.PING,
    "next": Code.NEXT,
    "writefile": Code.WRITEFILE,
    "readfile": Code.READFILE,
    "newcontainer": Code.NEWCONTAINER,
    "killcontainer": Code.KILLCONTAINER,
    "onlinecpumem": Code.ONLINECPUMEM,
    "setupinterface": Code.SETUPINTERFACE,
    "setuproute": Code.SETUPROUTE,
    "removecontainer": Code.REMOVECONTAINER,
}
# Kata renamed its copy of the library and sends these spellings.
_KATA_ALIASES: Final = {"startsandbox": Code.STARTPOD, "destroysandbox": Code.DESTROYPOD}

_CC_PSCONTAINER: Final = 23
_CC_PROCESSASYNCEVENT: Final = 24
_HYPER_PROCESSASYNCEVENT: Final = 23
_HYPER_SIGNALPROCESS: Final = 24
_HYPER_DELETEINTERFACE: Final = 25

_COMMON_DISPLAY: Final = {int(code): code.name.lower() for code in Code}


def _names(extra: Mapping[str, int]) -> Mapping[str, int]:
    table = {name: int(code) for name, code in _COMMON_NAMES.items()}
    table.update({name: int(code) for name, code in _KATA_ALIASES.items()})
    table.update(extra)
    return MappingProxyType(table)


CC: Final = Dialect(
    name="cc",
    names=_names({"pscontainer": _CC_PSCONTAINER}),
    ps_container=_CC_PSCONTAINER,
    process_async_event=_CC_PROCESSASYNCEVENT,
    signal_process=None,
    delete_interface=None,
    display_names=MappingProxyType(
        {
            **_COMMON_DISPLAY,
            _CC_PSCONTAINER: "pscontainer",
            _CC_PROCESSASYNCEVENT: "processasyncevent",
        }
    ),
)
"""virtcontainers / cc-agent / cc-proxy numbering (23 = PSCONTAINER, 24 = PROCESSASYNCEVENT)."""

HYPER: Final = Dialect(
    name="hyper",
    names=_names(
        {
            "processasyncevent": _HYPER_PROCESSASYNCEVENT,
            "signalprocess": _HYPER_SIGNALPROCESS,
            "deleteinterface": _HYPER_DELETEINTERFACE,
        }
    ),
    ps_container=None,
    process_async_event=_HYPER_PROCESSASYNCEVENT,
    signal_process=_HYPER_SIGNALPROCESS,
    delete_interface=_HYPER_DELETEINTERFACE,
    display_names=MappingProxyType(
        {
            **_COMMON_DISPLAY,
            _HYPER_PROCESSASYNCEVENT: "processasyncevent",
            _HYPER_SIGNALPROCESS: "signalprocess",
            _HYPER_DELETEINTERFACE: "deleteinterface",
        }
    ),
)
"""hyperhq/hyperstart >= v0.8 and runv numbering (23 = PROCESSASYNCEVENT, 24 = SIGNALPROCESS)."""

DIALECTS: Final[Mapping[str, Dialect]] = MappingProxyType({"cc": CC, "hyper": HYPER})
