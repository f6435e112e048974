"""``hyperd image build [--cache DIR] [--force]`` (also ``python -m hyperd.image build``).

Progress goes to stderr; the last line gives the image's paths, sizes and the build time.
Exit status 0 on success, 1 when the image cannot be built (the message says why).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hyperd.image.build import build_image, default_cache_dir
from hyperd.image.errors import ImageError

__all__ = ["add_arguments", "main", "run"]

EXIT_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="image_command", required=True)
    build = sub.add_parser("build", help="build the qemu backend's guest kernel and initrd")
    build.add_argument(
        "--cache", type=Path, help=f"image directory (default {default_cache_dir()})"
    )
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    build.add_argument(
        "--no-qemu-check",
        action="store_true",
        help="build even when qemu-system-x86_64 is not installed",
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def run(args: argparse.Namespace) -> int:
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        result = build_image(
            args.cache, force=args.force, progress=progress, check_qemu=not args.no_qemu_check
        )
    except ImageError as exc:
        print(f"hyperd image build: {exc}", file=sys.stderr)
        return EXIT_FAILED
    what = "built" if result.built else "up to date"
    print(
        f"image {what} in {result.seconds:.1f} s: kernel {result.kernel} "
        f"({_mib(result.kernel_bytes)}), initrd {result.initrd} ({_mib(result.initrd_bytes)})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperd image")
    add_arguments(parser)
    return run(parser.parse_args(argv))
