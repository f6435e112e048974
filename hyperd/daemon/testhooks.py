"""Test-only hooks, all off unless their environment variable is set.

- ``HYPERD_TEST_SIM_RECORD_DIR``: every simulated VM records the ctl commands it receives in
  ``<dir>/<pod>.jsonl`` (hyperd-sim ``--record``), so tests can check what STARTPOD carried.
- ``HYPERD_TEST_SIM_ARGS``: ``{"<pod>": [extra hyperd-sim arguments]}``, e.g. fault knobs.
- ``HYPERD_TEST_CRASH_AT``: the daemon SIGKILLs itself at that crash point (:func:`crash_point`).
"""

from __future__ import annotations

import logging
import os
import signal

import msgspec

log = logging.getLogger(__name__)

TEST_RECORD_ENV = "HYPERD_TEST_SIM_RECORD_DIR"  # test hook: sims record ctl commands there
TEST_CRASH_ENV = "HYPERD_TEST_CRASH_AT"  # test hook: SIGKILL the daemon at this crash point
TEST_SIM_ARGS_ENV = "HYPERD_TEST_SIM_ARGS"  # test hook: {"<pod>": [extra sim args]} (faults)


def sim_args(pod_id: str) -> list[str]:
    """Extra simulator arguments from the test hooks (none outside tests)."""
    extra: list[str] = []
    record_dir = os.environ.get(TEST_RECORD_ENV)
    if record_dir:
        extra += ["--record", os.path.join(record_dir, f"{pod_id}.jsonl")]
    per_pod = os.environ.get(TEST_SIM_ARGS_ENV)
    if per_pod:
        args = msgspec.json.decode(per_pod, type=dict[str, list[str]]).get(pod_id, [])
        extra += args
    return extra


def crash_point(name: str) -> None:
    """Test-only fault hook: die by SIGKILL here when ``$HYPERD_TEST_CRASH_AT`` names ``name``.

    Points: ``pod.start:vm-launched``, ``pod.start:registered``, ``container.start:mounted``,
    ``container.start:sent`` (NEWCONTAINER answered, ``running`` not saved yet),
    ``container.stop:removed`` (REMOVECONTAINER answered, ``stopped`` not saved yet).
    """
    if os.environ.get(TEST_CRASH_ENV) == name:
        log.warning("test fault hook: SIGKILL at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)
