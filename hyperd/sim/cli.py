"""Command line of hyperd-sim (console script ``hyperd-sim``, or ``python -m hyperd.sim``).

``--ready-fd FD``: once both sockets listen, ``ready\\n`` is written to FD and FD is closed, so a
spawner can wait without polling. Exit status: 0 after SIGTERM/SIGINT, :data:`CRASH_EXIT_STATUS`
after a ``--crash-after`` crash, :data:`USAGE_ERROR` for bad arguments or a start-up failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from hyperd.sim.server import SimConfig, Simulator
from protocol.hyperstart import DIALECTS

__all__ = ["USAGE_ERROR", "main", "parse_args"]

USAGE_ERROR = 2  # argparse's exit status, reused for start-up failures
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s hyperd-sim[%(process)d] %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("hyperd.sim")


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="hyperd-sim",
        description="A simulated VM: the agent side of the hyperstart protocol on two unix "
        "sockets (ctl and tty), running container processes as host processes. A development "
        "backend, not a security boundary: as root, containers get their own PID, mount, IPC "
        "and UTS namespaces, a pivot_root into their rootfs, a minimal /dev and Docker's "
        "default capabilities, but no user namespace, cgroups or seccomp; as another user, "
        "nothing is isolated.",
    )
    p.add_argument("--ctl", type=Path, required=True, help="ctl channel socket to listen on")
    p.add_argument("--tty", type=Path, required=True, help="tty channel socket to listen on")
    p.add_argument(
        "--share",
        type=Path,
        required=True,
        help="shared directory: container roots are SHARE/<image>/<rootfs>",
    )
    p.add_argument(
        "--dialect",
        choices=sorted(DIALECTS),
        default="cc",
        help="cc: cc-agent (default); hyper: hyperhq/hyperstart v1.1.0",
    )
    p.add_argument("--netns", type=Path, help="network namespace file the processes run in")
    p.add_argument("--record", type=Path, help="append one JSON line per ctl command received")
    p.add_argument("--delay", type=_seconds, default=0.0, help="seconds to wait before each reply")
    p.add_argument(
        "--silent-after", type=_count, metavar="N", help="answer nothing after N commands"
    )
    p.add_argument(
        "--crash-after",
        type=_count,
        metavar="N",
        help="close both sockets and exit nonzero at command N+1",
    )
    p.add_argument(
        "--garbage-after",
        type=_count,
        metavar="N",
        help="answer with garbage bytes after N commands",
    )
    p.add_argument(
        "--ready-fd", type=int, metavar="FD", help="write 'ready\\n' to FD once listening"
    )
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="log verbosity on stderr (default INFO)",
    )
    return p.parse_args(argv)


def _signal_ready(fd: int | None) -> None:
    """Tell the spawner we listen; a spawner that went away is not our problem."""
    if fd is None:
        return
    try:
        os.write(fd, b"ready\n")
    except OSError as exc:
        log.warning("cannot write to --ready-fd %d: %s", fd, exc)
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGTERM/SIGINT or a crash fault; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT, stream=sys.stderr)
    if not args.share.is_dir():
        log.error("shared directory %s does not exist", args.share)
        return USAGE_ERROR
    if args.ready_fd is not None:
        try:
            os.fstat(args.ready_fd)
        except OSError as exc:
            log.error("--ready-fd %d: %s", args.ready_fd, exc)
            return USAGE_ERROR
    if args.netns is not None and not args.netns.exists():
        log.error("network namespace %s does not exist", args.netns)
        return USAGE_ERROR
    config = SimConfig(
        ctl=args.ctl,
        tty=args.tty,
        share=args.share,
        dialect=DIALECTS[args.dialect],
        netns=args.netns,
        record=args.record,
        delay=args.delay,
        silent_after=args.silent_after,
        crash_after=args.crash_after,
        garbage_after=args.garbage_after,
    )
    simulator = Simulator(config)

    async def run() -> int:
        return await simulator.run(ready=lambda: _signal_ready(args.ready_fd))

    try:
        return anyio.run(run, backend="asyncio", backend_options={"use_uvloop": True})
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return USAGE_ERROR
