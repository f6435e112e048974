"""``containerd-shim-hyperd-v2``: containerd's runtime v2 shim for hyperd
(runtime name ``io.containerd.hyperd.v2``).

containerd runs it with Go-style flags and an action word, in the bundle directory:

    containerd-shim-hyperd-v2 -namespace NS -address SOCK -publish-binary BIN -id ID \
        [-debug] start
    containerd-shim-hyperd-v2 -namespace NS -address SOCK -publish-binary BIN -id ID \
        -bundle B delete

``start`` prints the ttrpc address of the pod's shim (starting the shim daemon unless the pod
already has one), ``delete`` cleans up after a task whose shim is gone and prints a
``DeleteResponse``. ``serve`` (internal) is the daemon, started by ``start`` with its listening
socket. The hyperd RPC socket is ``$HYPERD_SOCKET``, else ``hyperd_socket`` of the TOML file named
by the runtime options' ``config_path``, else hyperd's default.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from hyperd.shim import bundle as bundles

VERSION: Final = "0.1.0"
SOCKET_DIR: Final = "/run/containerd/s"  # where containerd's own shims put theirs
LISTEN_BACKLOG: Final = 128  # connections containerd may open before the daemon accepts
START_LOCK: Final = ".hyperd-shim-start.lock"
MAX_SOCKET_PATH: Final = 106  # containerd refuses longer unix socket paths
DELETE_EXIT_STATUS: Final = 137  # what runc's and kata's delete report: 128 + SIGKILL
CLEANUP_DEADLINE: Final = 4.0  # seconds; containerd gives the delete action 5
EXIT_USAGE: Final = 2
EXIT_FAILED: Final = 1

_BOOL_FLAGS: Final = frozenset({"debug", "v", "version"})
_VALUE_FLAGS: Final = frozenset(
    {
        "namespace",
        "address",
        "publish-binary",
        "id",
        "bundle",
        "socket",
        "socket-fd",
        "hyperd-socket",
    }
)


class UsageError(Exception):
    pass


@dataclass
class Args:
    action: str = ""
    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    socket: str = ""
    socket_fd: int = -1
    hyperd_socket: str = ""
    debug: bool = False
    version: bool = False


def parse_args(argv: Sequence[str]) -> Args:
    """Go ``flag`` syntax: ``-name value``, ``--name value``, ``-name=value``; then the action."""
    args = Args()
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            args.action = words[i + 1] if i + 1 < len(words) else ""
            break
        if not word.startswith("-") or word == "-":
            args.action = word
            break
        name, eq, value = word.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            setattr(args, "version" if name in ("v", "version") else name, value != "false")
        elif name in _VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(words):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = words[i]
            attr = name.replace("-", "_")
            setattr(args, attr, int(value) if attr == "socket_fd" else value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    return args


def socket_address(address: str, namespace: str, key: str) -> str:
    """``unix://`` path of the pod's shim socket, as runc derives its own (a hash of the
    containerd address, namespace and group key: unique per containerd)."""
    base = os.environ.get("HYPERD_SHIM_SOCKET_DIR") or SOCKET_DIR
    digest = hashlib.sha256(os.path.join(address, namespace, key).encode()).hexdigest()
    path = os.path.join(base, digest[:32])
    if len(path) > MAX_SOCKET_PATH:
        raise UsageError(f"shim socket path {path} is longer than {MAX_SOCKET_PATH} bytes")
    return "unix://" + path


def _alive(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def _write_atomic(path: str, data: str) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
    with open(tmp, "w") as f:
        f.write(data)
    os.replace(tmp, path)


def _options_config(raw: bytes) -> str:
    """``config_path`` of the runtime options containerd wrote on stdin (or "")."""
    if not raw:
        return ""
    from google.protobuf import any_pb2
    from google.protobuf.message import DecodeError

    from hyperd.shim.proto import runtimeoptions_pb2

    try:
        options = any_pb2.Any.FromString(raw)
        if options.type_url.endswith("runtimeoptions.v1.Options"):
            return runtimeoptions_pb2.Options.FromString(options.value).config_path
    except DecodeError:
        pass
    return ""


def hyperd_socket(config_path: str = "") -> str:
    """The hyperd RPC socket: ``$HYPERD_SOCKET``, the config file's ``hyperd_socket``, or
    hyperd's default."""
    env = os.environ.get("HYPERD_SOCKET")
    if env:
        return env
    if config_path:
        try:
            with open(config_path, "rb") as f:
                value = tomllib.load(f).get("hyperd_socket")
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"runtime config {config_path}: {exc}") from None
        if isinstance(value, str) and value:
            return value
    from hyperd.config import default_config

    return default_config().rpc.socket


def start(args: Args) -> int:
    """The ``start`` action: print the address of the pod's shim, starting it if needed."""
    options = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    bundle = args.bundle or os.getcwd()
    spec = bundles.read_config(bundle)
    key = bundles.group_key(spec, args.id)
    address = socket_address(args.address, args.namespace, key)
    path = address.removeprefix("unix://")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    # one start at a time in this directory, so two tasks of a pod never start two daemons
    with open(os.path.join(os.path.dirname(path), START_LOCK), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _alive(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            pid = _spawn_daemon(args, bundle, path, hyperd_socket(_options_config(options)))
            _write_atomic(os.path.join(bundle, "shim.pid"), str(pid))
    _write_atomic(os.path.join(bundle, "address"), address)
    sys.stdout.write(address)
    return 0


def _spawn_daemon(args: Args, bundle: str, path: str, hyperd: str) -> int:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(LISTEN_BACKLOG)  # containerd's connect waits there until we accept
        argv = [
            sys.executable, "-m", "hyperd.shim",
            "-namespace", args.namespace, "-address", args.address,
            "-publish-binary", args.publish_binary, "-id", args.id, "-bundle", bundle,
            "-socket", path, "-socket-fd", str(listener.fileno()), "-hyperd-socket", hyperd,
        ]  # fmt: skip
        if args.debug:
            argv.append("-debug")
        argv.append("serve")
        with open(os.devnull, "r+b") as devnull:
            proc = subprocess.Popen(
                argv,
                stdin=devnull,
                stdout=devnull,  # never containerd's pipe: it waits for EOF on it
                stderr=devnull,
                pass_fds=(listener.fileno(),),
                start_new_session=True,
                cwd=bundle,
            )
    finally:
        listener.close()
    return proc.pid


def delete(args: Args) -> int:
    """The ``delete`` action: clean up after ``args.id`` and print a ``DeleteResponse``."""
    from hyperd.shim.cleanup import cleanup, delete_response

    bundle = args.bundle or os.getcwd()
    try:
        cleanup(args, bundle, deadline=CLEANUP_DEADLINE)
    except Exception as exc:  # containerd logs our stderr as "cleanup warnings"
        print(f"cleanup of {args.id}: {exc}", file=sys.stderr)
    sys.stdout.buffer.write(delete_response(DELETE_EXIT_STATUS, time.time()))
    sys.stdout.buffer.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.version:
            print(f"containerd-shim-hyperd-v2 {VERSION}")
            return 0
        if args.action == "start":
            return start(args)
        if args.action == "delete":
            return delete(args)
        if args.action == "serve":
            from hyperd.shim.daemon import serve

            return serve(args)
        raise UsageError(f"unknown action {args.action!r} (start, delete)")
    except (UsageError, bundles.BundleError, OSError) as exc:
        print(f"containerd-shim-hyperd-v2: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
