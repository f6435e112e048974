"""``hyperd``: run the daemon, check or print its configuration.

    hyperd serve [--config FILE] [--base-dir DIR] [--socket PATH] [--state-dir DIR]
                 [--stop-pods-on-exit] [--log-level LEVEL] [--log-format FORMAT]
    hyperd config check FILE
    hyperd config default
    hyperd image build [--cache DIR] [--force]

With no ``--config`` and no ``/etc/hyperd/hyperd.toml``, ``serve`` runs the embedded default:
simulated VMs behind a per-pod hyperd-proxy, everything under one base directory
(``/run/hyperd`` as root, else ``$XDG_RUNTIME_DIR/hyperd`` or ``/tmp/hyperd-<uid>``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import msgspec

from hyperd.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    check_config,
    default_config,
    load_config,
    render_toml,
    resolve,
)

EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG: systemd does not restart-loop on a bad configuration


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperd", description="pod daemon for VM-isolated containers"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument(
        "--config", help=f"TOML config file (default {DEFAULT_CONFIG_PATH} if present)"
    )
    serve.add_argument("--base-dir", help="directory for sockets, state and the shared root")
    serve.add_argument("--socket", help="RPC socket path")
    serve.add_argument("--state-dir", help="where pod state is persisted")
    serve.add_argument(
        "--stop-pods-on-exit",
        action="store_true",
        default=None,
        help="stop every pod on SIGTERM/SIGINT (default: leave them running)",
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["auto", "journal", "json", "text"])
    config = sub.add_parser("config", help="check or print the configuration")
    csub = config.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="validate a config file")
    check.add_argument("file")
    csub.add_parser("default", help="print the embedded default configuration as TOML")
    from hyperd.image.cli import add_arguments as image_arguments

    image_arguments(sub.add_parser("image", help="build the qemu backend's guest image"))
    return parser


def build_config(args: argparse.Namespace) -> Config:
    """The configuration ``serve`` runs with: file (or embedded default) plus command line."""
    if args.config:
        config = load_config(args.config)
    elif os.path.exists(DEFAULT_CONFIG_PATH) and not args.base_dir:
        config = load_config(DEFAULT_CONFIG_PATH)
    else:
        config = Config()
    changes: dict[str, object] = {}
    if args.base_dir:
        base = os.path.abspath(args.base_dir)
        changes.update(base_dir=base, state_dir="", run_dir="", shared_root="")
        changes["rpc"] = msgspec.structs.replace(config.rpc, socket="")
    if args.state_dir:
        changes["state_dir"] = os.path.abspath(args.state_dir)
    if args.socket:
        rpc = changes.get("rpc", config.rpc)
        assert isinstance(rpc, type(config.rpc))
        changes["rpc"] = msgspec.structs.replace(rpc, socket=os.path.abspath(args.socket))
    if args.stop_pods_on_exit:
        changes["stop_pods_on_exit"] = True
    if args.log_level or args.log_format:
        changes["log"] = msgspec.structs.replace(
            config.log,
            level=args.log_level or config.log.level,
            format=args.log_format or config.log.format,
        )
    return resolve(msgspec.structs.replace(config, **changes))


def _serve(args: argparse.Namespace) -> int:
    from hyperd import notify
    from hyperd.logs import setup_logging

    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"hyperd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log.level, config.log.format)
    # pyroute2 logs every netlink message at debug level: keep it out of hyperd's debug log
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    activated = notify.listen_fds()  # before the event loop: systemd socket activation

    import anyio

    from hyperd.daemon.serve import serve

    async def run() -> None:
        await serve(config, activated=activated)

    try:
        anyio.run(run, backend="asyncio", backend_options={"use_uvloop": True})
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"hyperd: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "image":
        from hyperd.image.cli import run as run_image

        return run_image(args)
    if args.config_command == "check":
        problems = check_config(args.file)
        for problem in problems:
            print(problem, file=sys.stderr)
        if not problems:
            print(f"{args.file}: ok")
        return EXIT_CONFIG if problems else 0
    if args.config_command == "default":
        sys.stdout.write(render_toml(default_config()))
        return 0
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
