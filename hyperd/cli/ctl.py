"""``hyperctl``: hyperd's command-line client.

    hyperctl [--socket PATH] [--json] COMMAND ...

Every RPC method has a command (``hyperctl --help``); lists print as tables, ``--json`` prints
the raw result for scripts. ``hyperctl run POD -- CMD...`` is the shortcut: it creates and starts
a simulated pod if needed, creates a container, connects to the proxy as the shim would, starts
the container, streams its stdout/stderr, forwards stdin, and exits with the process's status.

The socket is ``--socket``, else ``$HYPERD_SOCKET``, else the embedded default's
(``/run/hyperd/hyperd.sock`` as root).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc

from hyperd.cli import rootfs as rootfs_builder
from hyperd.cli.attach import attach_and_start
from hyperd.cli.client import ConnectionClosed, RPCClient, RPCError, ShimError
from hyperd.cli.output import cell, show

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_STATUS_UNKNOWN = 255  # `wait` of a process whose exit status hyperd could not learn


def default_socket() -> str:
    env = os.environ.get("HYPERD_SOCKET")
    if env:
        return env
    from hyperd.config import default_config

    return default_config().rpc.socket


# ---- output --------------------------------------------------------------------------------


# ---- argument parsing ----------------------------------------------------------------------


def _process(args: argparse.Namespace) -> dict[str, Any]:
    if not args.cmd:
        raise SystemExit("hyperctl: give the command after --, e.g. -- sh -c 'echo hi'")
    process: dict[str, Any] = {"args": list(args.cmd)}
    if args.env:
        process["env"] = list(args.env)
    if args.cwd:
        process["cwd"] = args.cwd
    if args.user:
        process["user"] = args.user
    if args.group:
        process["group"] = args.group
    if args.terminal:
        process["terminal"] = True
    return process


def _add_process_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-e", "--env", action="append", metavar="KEY=VALUE", help="environment")
    p.add_argument("-w", "--cwd", help="working directory in the container")
    p.add_argument("-u", "--user", help="user (name or uid)")
    p.add_argument("-g", "--group", help="group (name or gid)")
    p.add_argument("-t", "--terminal", action="store_true", help="allocate a terminal")
    p.add_argument("cmd", nargs="*", help="command and arguments (after --)")


def _mounts(specs: list[str] | None) -> list[dict[str, Any]]:
    mounts = []
    for spec in specs or []:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise SystemExit(f"hyperctl: bad --mount {spec!r}: expected SRC:DST[:ro|rw]")
        options = ["ro"] if len(parts) == 3 and parts[2] == "ro" else []
        mounts.append({"source": parts[0], "destination": parts[1], "options": options})
    return mounts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperctl",
        description="control hyperd over its JSON-RPC socket",
        epilog="examples:\n"
        "  hyperctl run demo -- sh -c 'echo hello; exit 7'\n"
        "  hyperctl pod list\n"
        "  hyperctl container ps demo run-1a2b3c4d\n"
        "  hyperctl wait demo run-1a2b3c4d\n"
        "  hyperctl --json pod inspect demo\n"
        "  hyperctl call hyperd.stats '{}'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--socket",
        help="hyperd's RPC socket (default: $HYPERD_SOCKET or the embedded default's socket)",
    )
    parser.add_argument("--json", action="store_true", help="print raw JSON results")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("version", help="hyperd.version")
    sub.add_parser("health", help="hyperd.health")
    sub.add_parser("stats", help="hyperd.stats: per-VM connection statistics")
    sub.add_parser("events", help="events.subscribe: print events until interrupted")
    call = sub.add_parser("call", help="call any method with JSON params")
    call.add_argument("method")
    call.add_argument("params", nargs="?", default=None, help="JSON object")

    pod = sub.add_parser("pod", help="pods").add_subparsers(dest="verb", required=True)
    create = pod.add_parser("create", help="pod.create")
    create.add_argument("id")
    create.add_argument("--hostname")
    create.add_argument("--backend", choices=["sim", "external"])
    create.add_argument("--ctl", help="external VM: ctl socket")
    create.add_argument("--tty", help="external VM: tty socket")
    create.add_argument("--console", help="external VM: console socket")
    create.add_argument("--sim-dialect", choices=["cc", "hyper"], help="dialect the sim speaks")
    create.add_argument("--proxy-mode", choices=["pod", "system"])
    create.add_argument("--proxy-url", help="system proxy: unix:// URL")
    create.add_argument("--netns", help="network namespace path (e.g. /var/run/netns/NAME)")
    create.add_argument("--share-dir")
    create.add_argument("--share-tag")
    create.add_argument("--agent-dialect", choices=["cc", "hyper"], help="skip detection")
    for verb in ("start", "stop", "delete", "inspect"):
        pod.add_parser(verb, help=f"pod.{verb}").add_argument("id")
    pod.add_parser("list", help="pod.list")

    ctr = sub.add_parser("container", help="containers").add_subparsers(dest="verb", required=True)
    c = ctr.add_parser("create", help="container.create (prints the token and proxy URL)")
    c.add_argument("pod")
    c.add_argument("id")
    c.add_argument("--rootfs", required=True, help="rootfs directory on the host")
    c.add_argument("--readonly", action="store_true", help="mount the rootfs read-only")
    c.add_argument("--mount", action="append", metavar="SRC:DST[:ro]", help="bind volume")
    c.add_argument("--shim-pid", type=int)
    _add_process_options(c)
    for verb in ("start", "stop", "delete", "inspect"):
        p = ctr.add_parser(verb, help=f"container.{verb}")
        p.add_argument("pod")
        p.add_argument("id")
    ctr.add_parser("list", help="container.list").add_argument("pod")
    k = ctr.add_parser("kill", help="container.kill")
    k.add_argument("pod")
    k.add_argument("id")
    k.add_argument("--signal", "-s", default="TERM", help="name or number (default TERM)")
    k.add_argument("--all", action="store_true", help="signal every process of the container")
    ps = ctr.add_parser("ps", help="container.ps")
    ps.add_argument("pod")
    ps.add_argument("id")
    ps.add_argument("--format", default="", help="e.g. table or json")
    ps.add_argument("args", nargs="*", help="ps arguments (after --)")

    ex = sub.add_parser("exec", help="exec processes").add_subparsers(dest="verb", required=True)
    e = ex.add_parser("create", help="exec.create (prints the exec id, token and proxy URL)")
    e.add_argument("pod")
    e.add_argument("container")
    e.add_argument("--id", dest="exec_id")
    _add_process_options(e)
    for verb in ("start", "inspect"):
        p = ex.add_parser(verb, help=f"exec.{verb}")
        p.add_argument("pod")
        p.add_argument("exec_id")
    ew = ex.add_parser(
        "wait", help="exec.wait: wait for the exec process to end, print its status, exit with it"
    )
    ew.add_argument("pod")
    ew.add_argument("exec_id")
    ew.add_argument("--timeout", type=float, help="give up after this many seconds")
    er = ex.add_parser("run", help="exec create + shim + start: run a command, stream its output")
    er.add_argument("pod")
    er.add_argument("container")
    _add_process_options(er)

    wait = sub.add_parser(
        "wait",
        help="container.wait: wait for the container's process to end, print its status, "
        f"exit with it ({EXIT_STATUS_UNKNOWN} when unknown)",
    )
    wait.add_argument("pod")
    wait.add_argument("id", help="container id")
    wait.add_argument("--timeout", type=float, help="give up after this many seconds")

    run = sub.add_parser(
        "run",
        help="run a command in a new container of a (new) sim pod, streaming its output",
        description="Create pod POD (backend sim) unless it exists, start it unless running, "
        "create a container from --rootfs, act as its shim, start it, stream stdout/stderr, "
        "forward stdin, stop the container, and exit with the process's status. Default rootfs: "
        "a busybox rootfs hyperctl builds in <dir of the socket>/rootfs/busybox from the host's "
        "static busybox; without busybox installed, --rootfs is required.",
    )
    run.add_argument("pod")
    run.add_argument("--rootfs", help="rootfs directory (default: a generated busybox rootfs)")
    run.add_argument("--name", help="container id (default run-<random>)")
    run.add_argument(
        "--keep", action="store_true", help="keep the container (default: stop and delete it)"
    )
    run.add_argument("--no-stdin", action="store_true", help="do not forward stdin")
    _add_process_options(run)
    return parser


# ---- commands ------------------------------------------------------------------------------


async def _rpc(args: argparse.Namespace, client: RPCClient) -> Any:
    cmd, verb = args.command, getattr(args, "verb", None)
    if cmd in ("version", "health", "stats"):
        return await client.call(f"hyperd.{cmd}")
    if cmd == "call":
        raw = json.loads(args.params) if args.params else None
        return await client.call(args.method, raw)
    if cmd == "pod":
        if verb == "list":
            return await client.call("pod.list")
        if verb != "create":
            return await client.call(f"pod.{verb}", {"id": args.id})
        params: dict[str, Any] = {"id": args.id}
        vm: dict[str, Any] = {}
        if args.backend:
            vm["backend"] = args.backend
        for key in ("ctl", "tty", "console"):
            if getattr(args, key):
                vm[key] = getattr(args, key)
        if args.sim_dialect:
            vm["dialect"] = args.sim_dialect
        if vm:
            vm.setdefault("backend", "external" if "ctl" in vm else "sim")
            params["vm"] = vm
        if args.proxy_mode or args.proxy_url:
            params["proxy"] = {"mode": args.proxy_mode or "system"}
            if args.proxy_url:
                params["proxy"]["url"] = args.proxy_url
        for key in ("hostname", "netns", "share_dir", "share_tag", "agent_dialect"):
            if getattr(args, key):
                params[key] = getattr(args, key)
        return await client.call("pod.create", params)
    if cmd == "container":
        if verb == "list":
            return await client.call("container.list", {"pod": args.pod})
        base = {"pod": args.pod, "id": args.id}
        if verb == "create":
            params = {
                **base,
                "rootfs": {"path": args.rootfs, "readonly": args.readonly},
                "process": _process(args),
                "mounts": _mounts(args.mount),
            }
            if args.shim_pid:
                params["shim_pid"] = args.shim_pid
            return await client.call("container.create", params)
        if verb == "kill":
            sig: int | str = int(args.signal) if args.signal.isdigit() else args.signal
            return await client.call("container.kill", {**base, "signal": sig, "all": args.all})
        if verb == "ps":
            return await client.call(
                "container.ps", {**base, "format": args.format, "args": args.args}
            )
        return await client.call(f"container.{verb}", base)
    if cmd == "exec":
        if verb == "create":
            params = {"pod": args.pod, "container": args.container, "process": _process(args)}
            if args.exec_id:
                params["exec_id"] = args.exec_id
            return await client.call("exec.create", params)
        return await client.call(f"exec.{verb}", {"pod": args.pod, "exec_id": args.exec_id})
    raise SystemExit(f"hyperctl: unknown command {cmd}")


async def _events(client: RPCClient, args: argparse.Namespace) -> None:
    await client.call("events.subscribe", {})
    while True:
        note = await client.next_notification()
        event = note.get("params", {})
        if args.json:
            print(json.dumps(event, sort_keys=True), flush=True)
        else:
            extra = " ".join(
                f"{k}={v}"
                for k, v in sorted(event.items())
                if k not in ("kind", "pod", "state", "time")
            )
            print(
                f"{cell(event.get('time'))} {event.get('kind')} {event.get('pod')} "
                f"{event.get('state')} {extra}".rstrip(),
                flush=True,
            )


async def _wait(client: RPCClient, args: argparse.Namespace) -> int:
    """``hyperctl wait`` / ``hyperctl exec wait``: print the exit status, exit with it."""
    if args.command == "wait":
        method, params = "container.wait", {"pod": args.pod, "id": args.id}
    else:
        method, params = "exec.wait", {"pod": args.pod, "exec_id": args.exec_id}
    if args.timeout is not None:
        params["timeout"] = args.timeout
    result = await client.call(method, params)
    status = result.get("exit_status")
    if args.json:
        print(json.dumps(result, sort_keys=True))
    elif status is None:
        print(f"unknown ({result.get('reason') or 'no exit status'})")
    else:
        print(status)
    return EXIT_STATUS_UNKNOWN if status is None else int(status)


async def _run(client: RPCClient, args: argparse.Namespace) -> int:
    process = _process(args)
    try:
        pod = await client.call("pod.inspect", {"id": args.pod})
    except RPCError as exc:
        if exc.kind != "not_found":
            raise
        pod = await client.call("pod.create", {"id": args.pod, "vm": {"backend": "sim"}})
    if pod["state"] != "running":
        await client.call("pod.start", {"id": args.pod})
    cid = args.name or "run-" + secrets.token_hex(4)
    created = await client.call(
        "container.create",
        {"pod": args.pod, "id": cid, "rootfs": {"path": args.rootfs}, "process": process},
    )
    try:
        return await attach_and_start(
            client,
            created["proxy_url"],
            created["token"],
            "container.start",
            {"pod": args.pod, "id": cid},
            stdin=not args.no_stdin,
            terminal=args.terminal,
        )
    finally:
        if not args.keep:
            with anyio.CancelScope(shield=True):
                try:
                    await client.call("container.stop", {"pod": args.pod, "id": cid})
                    await client.call("container.delete", {"pod": args.pod, "id": cid})
                except RPCError as exc:
                    print(f"hyperctl: stopping container {cid}: {exc.message}", file=sys.stderr)


async def _exec_run(client: RPCClient, args: argparse.Namespace) -> int:
    created = await client.call(
        "exec.create", {"pod": args.pod, "container": args.container, "process": _process(args)}
    )
    return await attach_and_start(
        client,
        created["proxy_url"],
        created["token"],
        "exec.start",
        {"pod": args.pod, "exec_id": created["exec_id"]},
        stdin=True,
        terminal=args.terminal,
    )


async def _main(args: argparse.Namespace) -> int:
    try:
        client = await RPCClient.connect(args.socket)
    except OSError as exc:
        print(
            f"hyperctl: cannot connect to hyperd at {args.socket}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    async with client:
        if args.command == "events":
            await _events(client, args)
            return 0
        if args.command == "run":
            return await _run(client, args)
        if args.command == "exec" and args.verb == "run":
            return await _exec_run(client, args)
        if args.command == "wait" or (args.command == "exec" and args.verb == "wait"):
            return await _wait(client, args)
        show(await _rpc(args, client), as_json=args.json)
        return 0


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    after: list[str] = []
    if "--" in words:  # everything after the first -- is the command, never an option
        cut = words.index("--")
        words, after = words[:cut], words[cut + 1 :]
    args = _parser().parse_args(words)
    for name in ("cmd", "args"):
        if hasattr(args, name) and isinstance(getattr(args, name), list):
            setattr(args, name, getattr(args, name) + after)
            break
    else:
        if after:
            print("hyperctl: this command takes no arguments after --", file=sys.stderr)
            return EXIT_USAGE
    args.socket = args.socket or default_socket()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        if getattr(args, "rootfs", None):
            args.rootfs = os.path.abspath(args.rootfs)
        elif args.command == "run":
            args.rootfs = str(rootfs_builder.default_rootfs(args.socket))
        return anyio.run(_main, args)
    except BaseException as raised:
        exc = _leaf(raised)
        if isinstance(exc, RPCError):
            kind = f" [{exc.kind}]" if exc.kind else ""
            print(f"hyperctl: {exc.message}{kind}", file=sys.stderr)
            return EXIT_ERROR
        if isinstance(exc, ShimError | rootfs_builder.RootfsError | ConnectionClosed):
            print(f"hyperctl: {exc}", file=sys.stderr)
            return EXIT_ERROR
        if isinstance(exc, KeyboardInterrupt):
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
