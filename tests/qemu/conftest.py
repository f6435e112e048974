"""Fixtures of the qemu tests: the guest image (built once per machine and cached by the hash
of its inputs) and a hyperd whose ``[vm.qemu]`` points at it. The tests boot real VMs under
TCG (KVM when it really works), so every deadline is generous and named."""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperd.image import build_image
from tests.e2e.conftest import (  # noqa: F401  (fixtures)
    Hyperd,
    anyio_backend,
    hyperd,
    hyperd_factory,
    netns,
)

# the cache outlives a test run: rebuilt only when an input (a package, hyperd's source) changes
IMAGE_CACHE = Path(os.environ.get("HYPERD_TEST_IMAGE_CACHE", "/var/tmp/hyperd-test-image"))


@pytest.fixture(scope="session")
def guest_image() -> Iterator[tuple[Path, Path]]:
    """(kernel, initrd) of the guest image, built on first use."""
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    with open(IMAGE_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel run waits for the one building
        result = build_image(IMAGE_CACHE, progress=lambda line: print(line, file=sys.stderr))
    yield result.kernel, result.initrd


@pytest.fixture
def qemu_hyperd(
    hyperd_factory: Hyperd,  # noqa: F811
    guest_image: tuple[Path, Path],
) -> Iterator[Hyperd]:
    """A ``hyperd`` (not started) whose config points the qemu backend at the test image.

    Afterwards the guests' console and QEMU logs are printed (pytest shows them on failure).
    """
    kernel, initrd = guest_image
    config = hyperd_factory.base.parent / "hyperd.toml"
    config.write_text(
        "[timeouts]\nready = 120.0\ncommand = 60.0\nping_timeout = 20.0\n"
        f'[vm.qemu]\nkernel = "{kernel}"\ninitrd = "{initrd}"\naccel = "auto"\n'
    )
    hyperd_factory.args = ["--config", str(config)]
    try:
        yield hyperd_factory
    finally:
        for log in sorted((hyperd_factory.base / "run").glob("*/*.log")):
            text = log.read_text(errors="replace")[-6000:]
            print(f"---- {log.parent.name}/{log.name} ----\n{text}")
