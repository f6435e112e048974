"""Fixtures of the hyperd-sim tests: a simulator per test and busybox container roots."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.sim.hostclient import Sim, start_sim

EXTRA_APPLETS = ("stty", "readlink")  # beyond tests/conftest.py's list


@pytest.fixture
def sim(short_tmp: Path) -> Iterator[Sim]:
    """A CC-dialect simulator."""
    with start_sim(short_tmp) as s:
        yield s


@pytest.fixture
def add_rootfs(busybox_rootfs: Path) -> Callable[[Sim, str], Path]:
    """Place a copy of the busybox rootfs at ``<share>/<cid>/rootfs``; returns its path."""

    def add(s: Sim, cid: str) -> Path:
        dest = s.share / cid / "rootfs"
        shutil.copytree(busybox_rootfs, dest, symlinks=True)
        for applet in EXTRA_APPLETS:
            link = dest / "bin" / applet
            if not link.exists():
                os.symlink("busybox", link)
        return dest

    return add
