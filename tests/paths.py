"""Where the tests' data lives: a copy of the conformance transcripts recorded from the
reference cc-proxy 3.0.23 and the real hyperhq/hyperstart, kept in the repository so that a
fresh clone can replay them."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
CONFORMANCE = DATA / "conformance"
CCPROXY_TRANSCRIPTS = CONFORMANCE / "ccproxy"
HYPERSTART_TRANSCRIPTS = CONFORMANCE / "hyperstart"
