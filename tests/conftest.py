"""Shared fixtures.

Async tests use anyio's own pytest plugin (not pytest-asyncio); they run on asyncio and on
asyncio with uvloop, the loop hyperd runs on in production.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis must not depend on the machine being idle: no per-example deadline and no
# "input generation is slow" health check (both measure wall-clock time, which a busy CI machine
# stretches). In CI (CI set in the environment, or HYPOTHESIS_PROFILE=ci) the examples are
# derandomized, so a failure there is the same failure on a developer's machine; elsewhere they are
# random and a failure prints the seed that reproduces it (``--hypothesis-seed=N``).
_TIMING_FREE: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow],
    "print_blob": True,
}
settings.register_profile("dev", **_TIMING_FREE)
settings.register_profile("ci", derandomize=True, database=None, **_TIMING_FREE)
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
settings.load_profile(_PROFILE)


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: unix socket paths must stay under 108 bytes."""
    import tempfile

    d = tempfile.mkdtemp(prefix="hd-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


BUSYBOX_APPLETS = ("sh", "cat", "echo", "sleep", "ls", "true", "false", "env", "id", "pwd", "yes")


def make_busybox_rootfs(root: Path) -> Path:
    """Populate ``root`` with a static busybox and its common applets; returns ``root``."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox is not installed (Debian package busybox-static)")
    for sub in ("bin", "proc", "dev", "tmp", "etc"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        link = root / "bin" / applet
        if not link.exists():
            os.symlink("busybox", link)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    return root


@pytest.fixture
def busybox_rootfs(tmp_path: Path) -> Path:
    """A real container rootfs: a directory tree with a static busybox."""
    return make_busybox_rootfs(tmp_path / "rootfs")
