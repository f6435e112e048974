"""``hyperd-agent``: hyperd's guest agent (also ``python -m hyperd.guest``).

    hyperd-agent guest [--share DIR] [--ctl PORT] [--tty PORT] [--dialect cc|hyper]
    hyperd-agent host --ctl SOCK --tty SOCK --share DIR [hyperd-sim's options]

``guest`` runs inside a VM (the image's ``/init`` starts it): on the virtio-serial ports, with
the pod's share mounted at ``--share``. ``host`` runs the same agent as a host process on two
unix sockets, for development and tests (what ``hyperd-sim`` runs; it takes the same options).
Exit status: 0 after DESTROYPOD or SIGTERM, 2 for bad arguments or a start-up failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from hyperd.guest import CTL_PORT, SHARE_MOUNT, TTY_PORT
from hyperd.guest.agent import GuestSimulator
from hyperd.sim import cli as sim_cli
from hyperd.sim.server import SimConfig
from protocol.hyperstart import DIALECTS

__all__ = ["main"]

USAGE_ERROR = 2
LOG_FORMAT = "hyperd-agent[%(process)d] %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("hyperd.guest")


def _guest_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hyperd-agent guest", description="hyperd's agent inside a VM, on virtio-serial ports"
    )
    p.add_argument(
        "--share",
        type=Path,
        default=Path(SHARE_MOUNT),
        help=f"where the pod's 9p share is mounted (default {SHARE_MOUNT})",
    )
    p.add_argument("--ctl", type=Path, default=Path(CTL_PORT), help="ctl port device")
    p.add_argument("--tty", type=Path, default=Path(TTY_PORT), help="tty port device")
    p.add_argument(
        "--dialect", choices=sorted(DIALECTS), default="cc", help="agent dialect (default cc)"
    )
    p.add_argument(
        "--log-level", type=str.upper, default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    return p


def run_guest(argv: Sequence[str]) -> int:
    args = _guest_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    if not args.share.is_dir():
        log.error("share %s is not a directory (was the 9p share mounted?)", args.share)
        return USAGE_ERROR
    config = SimConfig(ctl=args.ctl, tty=args.tty, share=args.share, dialect=DIALECTS[args.dialect])

    async def run() -> int:
        agent = GuestSimulator(config)
        return await agent.run(ready=lambda: log.info("serving %s and %s", args.ctl, args.tty))

    try:
        return anyio.run(run, backend="asyncio", backend_options={"use_uvloop": True})
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return USAGE_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("guest", "host"):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return USAGE_ERROR
    if args[0] == "host":
        return sim_cli.main(args[1:])
    return run_guest(args[1:])
