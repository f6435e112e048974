"""The fault soak: ``python -m hyperd.bench soak --minutes N``.

    python -m hyperd.bench soak [--minutes N] [--clients C] [--faults sim,proxy,hyperd]
                                [--seed S] [--json FILE]

A real hyperd (the embedded default: a simulated VM and a hyperd-proxy per pod) serves
``--clients`` concurrent clients, each driving its own pod as a runtime would: create and start
the pod, then over and over create a container, claim its token as the shim, start it, read
its output and exit status, delete it, with inspections and batches in between. Meanwhile a
fault task kills, in turn, a random pod's simulated VM, a random pod's proxy, and hyperd
itself (SIGKILL; hyperd is then restarted on the same state and re-adopts what runs;
``--faults`` picks the kinds). Clients
recover as a runtime would (a pod that lost its VM is stopped and started again).

Invariants, checked all along and at the end; each breach is a *violation*:

- every call is answered, or fails with a clear error: a JSON-RPC error with a ``data.kind``
  other than an internal error, a refused or closed proxy connection, or a dropped RPC
  connection *because hyperd was killed*. A call with no answer within ``CALL_DEADLINE``, an
  internal error, or a connection dropped while hyperd was not being killed is a violation;
- no misrouted reply: every answer carries its request's id, every result names the pod or
  container that was asked about, and a container's output is that container's own marker;
- nothing leaks: once the load stops and every pod is stopped and deleted, no process started
  for the run is left (the runner is the subreaper of everything below it, so even processes
  orphaned by a killed hyperd are found), no mount is left under the run's directory, and
  hyperd holds no more file descriptors than when it started with no pods.

Exit status 0 when there were no violations, 1 otherwise, 2 for bad arguments. Needs root
(mounts) and a static busybox, like the other daemon scenarios.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import logging
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import anyio.abc
import msgspec

from hyperd.bench.daemon import Daemon, busybox_rootfs, start_daemon
from hyperd.bench.procs import descendant_pids
from hyperd.bench.topology import Workspace
from hyperd.cli.client import ShimClient, ShimError
from hyperd.host.mountsys import read_mountinfo

log = logging.getLogger("hyperd.bench.soak")

CALL_DEADLINE: Final = 90.0  # seconds one call may take: pod.start is bounded by ready (35 s)
RECONNECT_DEADLINE: Final = 60.0  # seconds a client waits for hyperd to listen again
ORPHAN_GRACE: Final = 10.0  # seconds for killed leftovers to be reaped at the very end
FD_SETTLE: Final = 10.0  # seconds for hyperd to close what the cleanup's connection used
DEFAULT_CLIENTS: Final = 6
FAULT_INTERVAL: Final = (1.5, 5.0)  # seconds between faults (uniform)
FAULTS: Final = ("sim", "proxy", "hyperd")  # taken in turn
INTERNAL_ERROR: Final = -32603
PR_SET_CHILD_SUBREAPER: Final = 36
READ_SIZE: Final = 1 << 16
EXIT_VIOLATIONS = 1
EXIT_USAGE = 2


PROXY_GONE: Final = (
    ShimError,  # refused the token, or closed before answering
    OSError,  # the socket is gone (connect) or was reset
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)
"""What a shim sees when the proxy refuses it or goes away: a clear error, not a breach."""


class Misrouted(Exception):
    """An answer that belongs to another request, pod or container."""


class Dropped(Exception):
    """The RPC connection ended before the answer came."""


class CallError(Exception):
    """A JSON-RPC error answer."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", ""))
        self.code = error.get("code")
        data = error.get("data")
        self.kind = data.get("kind") if isinstance(data, dict) else None


@dataclass
class Tally:
    """What happened, for the report."""

    calls: int = 0
    answered: int = 0
    cut: int = 0  # calls in flight when the run ended (cancelled, not a breach)
    errors: Counter[str] = field(default_factory=Counter)
    containers_run: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    violations: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    fds: tuple[int, int] = (0, 0)

    def violation(self, what: str, detail: str) -> None:
        self.violations[what] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{what}: {detail}")
        log.error("violation: %s: %s", what, detail)

    def report(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "answered": self.answered,
            "cut_by_the_end": self.cut,
            "clear_errors": dict(self.errors),
            "containers_run": self.containers_run,
            "faults": dict(self.faults),
            "violations": dict(self.violations),
            "violation_examples": self.examples,
            "leaks": self.leaks,
            "hyperd_fds": {"idle_at_start": self.fds[0], "after_cleanup": self.fds[1]},
        }


class Rpc:
    """A JSON-RPC connection that checks every answer's id (one call at a time)."""

    def __init__(self, stream: anyio.abc.SocketStream, soak: Soak) -> None:
        self.stream = stream
        self.soak = soak
        self.buffer = b""
        self.ids = itertools.count(1)

    async def call(self, method: str, params: Any = None) -> Any:
        """The result; raises CallError, Dropped or Misrouted. A breach is tallied here."""
        rid = next(self.ids)
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rid}
        if params is not None:
            message["params"] = params
        answer = await self._exchange(msgspec.json.encode(message), method)
        if not isinstance(answer, dict) or answer.get("id") != rid:
            self.soak.tally.violation("misrouted", f"{method} id {rid} got {answer!r:.200}")
            raise Misrouted(method)
        return self._result(method, answer)

    async def batch(self, calls: list[tuple[str, Any]]) -> list[Any]:
        """Results (or CallError instances) of a batch, in the order of ``calls``."""
        first = next(self.ids)
        for _ in calls[1:]:
            next(self.ids)
        body = [
            {"jsonrpc": "2.0", "method": m, "id": first + i} | ({"params": p} if p else {})
            for i, (m, p) in enumerate(calls)
        ]
        answer = await self._exchange(msgspec.json.encode(body), "batch")
        if not isinstance(answer, list) or sorted(a.get("id") for a in answer) != [
            first + i for i in range(len(calls))
        ]:
            self.soak.tally.violation("misrouted", f"batch {first}.. got {answer!r:.200}")
            raise Misrouted("batch")
        by_id = {a["id"]: a for a in answer}
        out: list[Any] = []
        for i, (method, _params) in enumerate(calls):
            try:
                out.append(self._result(method, by_id[first + i]))
            except CallError as exc:
                out.append(exc)
        return out

    def _result(self, method: str, answer: dict[str, Any]) -> Any:
        if "error" in answer:
            error = CallError(answer["error"])
            if error.code == INTERNAL_ERROR or not error.kind:
                self.soak.tally.violation("unclear error", f"{method}: {answer['error']!r:.200}")
            else:
                self.soak.tally.errors[str(error.kind)] += 1
            raise error
        return answer.get("result")

    async def _exchange(self, data: bytes, method: str) -> Any:
        tally = self.soak.tally
        tally.calls += 1
        generation = self.soak.generation
        try:
            with anyio.fail_after(CALL_DEADLINE):
                await self.stream.send(data + b"\n")
                while b"\n" not in self.buffer:
                    chunk = await self.stream.receive(READ_SIZE)
                    self.buffer += chunk
        except anyio.get_cancelled_exc_class():
            tally.cut += 1
            raise
        except TimeoutError:
            tally.violation("unanswered", f"{method}: no answer within {CALL_DEADLINE:g} s")
            raise Dropped(method) from None
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            if self.soak.generation == generation and not self.soak.killing:
                tally.violation("dropped", f"{method}: connection lost ({exc!r}) with hyperd up")
            else:
                tally.errors["hyperd killed"] += 1
            raise Dropped(method) from None
        line, _, self.buffer = self.buffer.partition(b"\n")
        tally.answered += 1
        return msgspec.json.decode(line)


class Soak:
    """One run: the daemon, the clients, the fault task and the final checks."""

    def __init__(
        self,
        ws: Workspace,
        minutes: float,
        clients: int,
        rng: random.Random,
        faults: Sequence[str] = FAULTS,
    ) -> None:
        self.ws = ws
        self.faults = tuple(faults)
        self.minutes = minutes
        self.clients = clients
        self.rng = rng
        self.tally = Tally()
        self.daemon: Daemon | None = None
        self.base = ws.path("hyperd")
        self.generation = 0  # hyperd kills so far
        self.killing = False  # a kill and restart of hyperd is under way
        self.up = anyio.Event()  # hyperd listens
        self.rootfs = ""

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> Tally:
        self.rootfs = await anyio.to_thread.run_sync(busybox_rootfs, self.ws)
        await self._start_daemon()
        assert self.daemon is not None
        await self._warm_up()
        idle_fds = _fds(self.daemon.proc.pid)
        async with anyio.create_task_group() as tg:
            for i in range(self.clients):
                tg.start_soon(self._client, i)
            tg.start_soon(self._faults)
            await anyio.sleep(self.minutes * 60)
            tg.cancel_scope.cancel()
        await self._cleanup()
        assert self.daemon is not None
        # the cleanup's own connection closes asynchronously: give hyperd a moment to see it
        deadline = time.monotonic() + FD_SETTLE
        while len(fds := _fds(self.daemon.proc.pid)) > len(idle_fds):
            if time.monotonic() > deadline:
                more = sorted(Counter(fds.values()) - Counter(idle_fds.values()))
                self.tally.leaks.append(f"hyperd holds {len(fds) - len(idle_fds)} more fds: {more}")
                break
            await anyio.sleep(0.1)
        self.tally.fds = (len(idle_fds), len(fds))
        self.tally.leaks += self._leftovers()
        for leak in self.tally.leaks:
            self.tally.violation("leak", leak)
        return self.tally

    async def _warm_up(self) -> None:
        """One pod's whole life before the load: what hyperd opens once and keeps (e.g. a
        /dev/null at its first helper start) is then in the fd baseline, not taken for a leak."""
        rpc = await self._connect()
        try:
            await self._ensure_running(rpc, "soak-warmup")
            await self._run_container(rpc, "soak-warmup", "c0")
            await rpc.call("pod.stop", {"id": "soak-warmup"})
            await rpc.call("pod.delete", {"id": "soak-warmup"})
        finally:
            await rpc.stream.aclose()

    async def _start_daemon(self) -> None:
        self.daemon = await anyio.to_thread.run_sync(
            lambda: start_daemon(self.ws, stop_pods=False, base=self.base)
        )
        self.up.set()

    async def _connect(self) -> Rpc:
        with anyio.fail_after(RECONNECT_DEADLINE):
            while True:
                await self.up.wait()
                assert self.daemon is not None
                try:
                    return Rpc(await anyio.connect_unix(self.daemon.socket), self)
                except OSError:
                    if not self.killing:
                        raise
                    await anyio.sleep(0.05)  # restart under way: hyperd listens again soon

    # -- load ----------------------------------------------------------------------------------

    async def _client(self, index: int) -> None:
        pod = f"soak-{index}"
        serial = itertools.count()
        while True:
            try:
                rpc = await self._connect()
            except (OSError, TimeoutError) as exc:
                self.tally.violation("unanswered", f"client {index}: cannot reconnect: {exc!r}")
                await anyio.sleep(1)
                continue
            try:
                while True:
                    await self._ensure_running(rpc, pod)
                    await self._run_container(rpc, pod, f"c{next(serial)}")
                    await self._look(rpc, pod)
            except (Dropped, Misrouted, CallError):
                pass  # tallied; start over on a fresh connection
            except Exception as exc:  # the runner's own bug: the figures cannot be trusted
                self.tally.violation("runner error", f"client {index}: {exc!r}")
                log.exception("client %d", index)
            finally:
                await rpc.stream.aclose()

    async def _ensure_running(self, rpc: Rpc, pod: str) -> None:
        try:
            info = await rpc.call("pod.inspect", {"id": pod})
        except CallError as exc:
            if exc.kind != "not_found":
                raise
            await rpc.call("pod.create", {"id": pod})
            info = await rpc.call("pod.inspect", {"id": pod})
        self._check(info.get("id") == pod, f"pod.inspect {pod} answered {info.get('id')}")
        if info["state"] == "running":
            return
        if info["state"] not in ("created", "stopped"):
            await rpc.call("pod.stop", {"id": pod})  # e.g. unreachable: its VM was killed
        started = await rpc.call("pod.start", {"id": pod})
        self._check(started.get("id") == pod, f"pod.start {pod} answered {started.get('id')}")

    async def _run_container(self, rpc: Rpc, pod: str, cid: str) -> None:
        marker = f"{pod}/{cid}"
        created = await rpc.call(
            "container.create",
            {
                "pod": pod,
                "id": cid,
                "rootfs": {"path": self.rootfs},
                "process": {"args": ["echo", marker]},
            },
        )
        self._check(created.get("id") == cid, f"container.create {cid} answered {created!r:.100}")
        try:
            with anyio.fail_after(CALL_DEADLINE):
                shim = await ShimClient.connect(created["proxy_url"], created["token"])
        except (*PROXY_GONE, TimeoutError) as exc:
            self.tally.errors["proxy refused or gone"] += 1
            log.info("%s: shim cannot connect: %r", marker, exc)
            await self._delete(rpc, pod, cid)
            return
        try:
            output = bytearray()
            with anyio.fail_after(CALL_DEADLINE):
                await shim.wait_connected()
                await rpc.call("container.start", {"pod": pod, "id": cid})
                status = await shim.pump(output.extend, lambda _data: None)
        except PROXY_GONE as exc:
            self.tally.errors["proxy refused or gone"] += 1
            log.info("%s: shim: %r", marker, exc)
            status = None
        except TimeoutError:
            self.tally.violation("unanswered", f"{marker}: no exit status in {CALL_DEADLINE:g} s")
            status = None
        finally:
            await shim.aclose()
        if status is None:
            self.tally.errors["proxy closed the shim"] += 1
        else:
            self._check(
                status == 0 and output.decode() == marker + "\n",
                f"{marker}: status {status}, output {bytes(output)!r:.100}",
            )
            self.tally.containers_run += 1
        await self._delete(rpc, pod, cid)

    async def _delete(self, rpc: Rpc, pod: str, cid: str) -> None:
        with contextlib.suppress(CallError):
            await rpc.call("container.stop", {"pod": pod, "id": cid})
        await rpc.call("container.delete", {"pod": pod, "id": cid})

    async def _look(self, rpc: Rpc, pod: str) -> None:
        results = await rpc.batch(
            [
                ("hyperd.version", None),
                ("pod.inspect", {"id": pod}),
                ("container.list", {"pod": pod}),
            ]
        )
        inspected = results[1]
        if not isinstance(inspected, CallError):
            self._check(inspected.get("id") == pod, f"batch pod.inspect {pod}: {inspected!r:.100}")
        listed = results[2]
        if not isinstance(listed, CallError):
            for container in listed.get("containers", []):
                self._check(
                    container.get("pod", pod) == pod, f"container.list {pod}: {container!r:.100}"
                )

    def _check(self, ok: bool, detail: str) -> None:
        if not ok:
            self.tally.violation("misrouted", detail)
            raise Misrouted(detail)

    # -- faults --------------------------------------------------------------------------------

    async def _faults(self) -> None:
        if not self.faults:
            return
        for what in itertools.cycle(self.faults):
            await anyio.sleep(self.rng.uniform(*FAULT_INTERVAL))
            try:
                if what == "hyperd":
                    await self._kill_hyperd()
                elif await self._kill_helper(what):
                    self.tally.faults[what] += 1
            except (OSError, Dropped, Misrouted, CallError, TimeoutError) as exc:
                log.info("fault %s not injected: %r", what, exc)
            except Exception as exc:  # e.g. hyperd did not restart: the run cannot go on
                self.tally.violation("runner error", f"fault {what}: {exc!r}")
                raise

    async def _kill_helper(self, what: str) -> bool:
        """SIGKILL the simulated VM or the proxy of a random running pod."""
        rpc = await self._connect()
        try:
            pods = (await rpc.call("pod.list"))["pods"]
            running = [p["id"] for p in pods if p["state"] == "running"]
            if not running:
                return False
            info = await rpc.call("pod.inspect", {"id": self.rng.choice(running)})
        finally:
            await rpc.stream.aclose()
        pid = info.get("vm_pid" if what == "sim" else "proxy_pid")
        module = "hyperd.sim" if what == "sim" else "hyperd.proxy"
        if not pid or not _runs(pid, module, self.base):
            return False  # never signal a process that is not this run's
        os.kill(pid, signal.SIGKILL)
        log.info("killed the %s of pod %s (pid %d)", what, info["id"], pid)
        return True

    async def _kill_hyperd(self) -> None:
        # shielded: the end of the run must not come between the kill and the restart
        with anyio.CancelScope(shield=True):
            await self._kill_and_restart()

    async def _kill_and_restart(self) -> None:
        assert self.daemon is not None
        self.killing = True
        self.up = anyio.Event()
        self.generation += 1
        proc = self.daemon.proc
        proc.kill()
        await anyio.to_thread.run_sync(proc.wait)
        self.ws.procs.stop(proc)  # forget it
        self.tally.faults["hyperd"] += 1
        log.info("killed hyperd (pid %d); restarting", proc.pid)
        try:
            await self._start_daemon()
        finally:
            self.killing = False

    # -- the end -------------------------------------------------------------------------------

    async def _cleanup(self) -> None:
        """Stop and delete every pod."""
        rpc = await self._connect()  # after a restart under way (see _kill_hyperd)
        try:
            for pod in (await rpc.call("pod.list"))["pods"]:
                for step in ("pod.stop", "pod.delete"):
                    try:
                        await rpc.call(step, {"id": pod["id"]})
                    except CallError as exc:
                        if exc.kind != "invalid_state":
                            self.tally.leaks.append(f"{step} {pod['id']}: {exc}")
            left = (await rpc.call("pod.list"))["pods"]
            if left:
                self.tally.leaks.append(f"pods left after cleanup: {left!r:.200}")
        finally:
            await rpc.stream.aclose()

    def _leftovers(self) -> list[str]:
        """Processes below the runner other than hyperd, and mounts under the run's dir."""
        assert self.daemon is not None
        leaks = []
        for pid in descendant_pids(os.getpid(), live=True):
            if pid != self.daemon.proc.pid:
                leaks.append(f"process {pid} left: {_cmdline(pid)!r:.120}")
        prefix = str(self.ws.root) + "/"
        for mount in read_mountinfo():
            if mount.mount_point.startswith(prefix):
                leaks.append(f"mount left: {mount.mount_point}")
        return leaks


# -- /proc helpers ---------------------------------------------------------------------------


def _fds(pid: int) -> dict[str, str]:
    """The open descriptors of ``pid`` and what they are (``socket:[…]`` and so on)."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            out[fd] = target.split(":")[0] if ":" in target else target
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _runs(pid: int, module: str, base: str) -> bool:
    """Whether ``pid`` is ``python -m module`` working under ``base``."""
    line = _cmdline(pid)
    return f"-m {module}" in line and base in line


def _become_subreaper() -> None:
    """Orphans below us (helpers of a killed hyperd) become our children: none escapes the
    leak check."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _stop_orphans() -> None:
    """Kill whatever is still below the runner (only this run's processes can be: it is their
    subreaper), then reap them, so that not even a failed run leaves a process behind."""
    for pid in descendant_pids(os.getpid(), live=True):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + ORPHAN_GRACE
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # none left
        if pid == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)


# -- command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hyperd bench soak",
        description="fault soak: concurrent clients while sims, proxies and hyperd are killed",
    )
    p.add_argument("--minutes", type=float, default=5.0, help="duration of the load (default 5)")
    p.add_argument("--clients", type=int, default=DEFAULT_CLIENTS, help="concurrent clients")
    p.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help="kinds of faults, injected in turn (default sim,proxy,hyperd; empty: none)",
    )
    p.add_argument("--seed", type=int, help="random seed (default: from the clock; printed)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--log-level", default="warning", help="runner log level")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.minutes <= 0 or args.clients < 1:
        print("hyperd bench soak: --minutes and --clients must be positive", file=sys.stderr)
        return EXIT_USAGE
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if set(faults) - set(FAULTS):
        print(f"hyperd bench soak: --faults: choose from {','.join(FAULTS)}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s soak %(levelname)s %(name)s: %(message)s",
    )
    seed = args.seed if args.seed is not None else int(time.time())
    _become_subreaper()
    ws = Workspace()
    started = time.monotonic()
    try:
        soak = Soak(ws, args.minutes, args.clients, random.Random(seed), faults)
        tally = anyio.run(soak.run, backend="asyncio", backend_options={"use_uvloop": True})
    finally:
        ws.close()
        _stop_orphans()
    report = {
        "minutes": args.minutes,
        "clients": args.clients,
        "fault_kinds": faults,
        "seed": seed,
        "wall_seconds": round(time.monotonic() - started, 1),
        **tally.report(),
    }
    print(
        f"hyperd soak: {args.minutes:g} min, {args.clients} clients, "
        f"faults {','.join(faults) or 'none'}, seed {seed}"
    )
    print(
        f"  calls made:            {tally.calls} ({tally.answered} answered, "
        f"{tally.errors['hyperd killed']} cut by hyperd kills, {tally.cut} by the end of the run)"
    )
    print(f"  containers run:        {tally.containers_run}")
    injected = ", ".join(f"{k} {v}" for k, v in sorted(tally.faults.items())) or "none"
    print(f"  faults injected:       {sum(tally.faults.values())} ({injected})")
    errors = ", ".join(f"{k} {v}" for k, v in sorted(tally.errors.items())) or "none"
    print(f"  clear errors:          {sum(tally.errors.values())} ({errors})")
    print(f"  hyperd fds:            {tally.fds[0]} idle at start, {tally.fds[1]} after cleanup")
    print(f"  invariant violations:  {sum(tally.violations.values())}")
    for example in tally.examples:
        print(f"    {example}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    sys.stdout.flush()
    return EXIT_VIOLATIONS if tally.violations else 0
