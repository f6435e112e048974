"""``protocol`` is sans-IO: importing it pulls in no async library, no sockets and no hyperd."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = (
    "anyio",
    "asyncio",
    "trio",
    "uvloop",
    "socket",
    "selectors",
    "ssl",
    "hyperd",
    "pyroute2",
)

PROBE = f"""
import sys
before = set(sys.modules)
import protocol, protocol.ccproxy, protocol.hyperstart, protocol.jsonrpc, protocol.ttrpc
loaded = set(sys.modules) - before
bad = sorted(m for m in loaded if m.split(".")[0] in {FORBIDDEN!r})
print(",".join(bad))
"""


def test_import_protocol_is_pure() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "", f"protocol imported: {out.stdout.strip()}"


def test_probe_detects_a_forbidden_import() -> None:
    """The probe itself works: importing anyio next to protocol is reported."""
    probe = PROBE.replace("import protocol,", "import anyio, protocol,")
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert "anyio" in out.stdout
