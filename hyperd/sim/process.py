"""Real host processes standing in for a simulated container's processes.

:func:`spawn` starts one process in its own session (so it leads a process group the simulator can
kill as a whole) with its identity, environment, working directory and optionally a network
namespace. Running as root, a container's init gets namespaces, a root and capabilities of its
own and exec'd processes join them (:mod:`hyperd.sim.isolation`); otherwise processes run in the
container directory as the simulator's user, with nothing isolated. Its stdio is a pipe set or a
pty. :meth:`SimProcess.run` pumps its output to a callback, feeds it queued stdin and returns the
exit status once the process has exited and its output is drained.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import termios
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from hyperd.sim import isolation
from hyperd.sim.isolation import Namespaces
from hyperd.sim.rootfs import BindMount, Identity

__all__ = ["LaunchSpec", "OutputSink", "SimProcess", "exit_status", "kill_group_quietly", "spawn"]

log = logging.getLogger(__name__)

READ_CHUNK = 4096  # bytes per output read; one tty frame each
DRAIN_GRACE = 1.0  # seconds to wait for output EOF after exit (a grandchild may hold the pipe)
CLONE_NEWNET = 0x40000000  # <sched.h>; os.CLONE_NEWNET only exists from Python 3.12
PR_SET_PDEATHSIG = 1  # <sys/prctl.h>: signal the child when its parent dies
PARENT_GONE_STATUS = 1  # the simulator died while the child was being set up
SIGNAL_EXIT_BASE = 128  # shell convention: killed by signal N -> 128 + N

_libc = ctypes.CDLL(None, use_errno=True)

OutputSink = Callable[[int, bytes], Awaitable[None]]
"""Called with (seq, data) for each chunk of process output."""


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything needed to start one process. ``root`` is the container root on the host."""

    args: Sequence[str]
    env: dict[str, str]
    root: Path
    workdir: str
    identity: Identity | None  # None: keep the simulator's own identity (not root)
    chroot: bool
    terminal: bool
    separate_stderr: bool  # terminal only: stderr on its own pipe instead of the pty
    netns_fd: int | None = None
    binds: tuple[BindMount, ...] = ()  # fsmap entries, mounted when chrooting
    # chroot mode isolates (hyperd.sim.isolation): a container's init gets namespaces of its
    # own; an exec'd process joins its container's (``namespaces``)
    namespaces: Namespaces | None = None
    capabilities: int | None = None  # bit mask; None: Docker's default set
    no_new_privileges: bool = False
    hostname: str = ""


def _libc_check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _child_setup(
    spec: LaunchSpec, status_fd: int, sim_pidfd: int, console_fd: int
) -> Callable[[], None]:
    """The pre-exec hook: runs in the forked child after stdio is in place, before exec."""
    root = os.fsencode(spec.root)
    workdir = spec.workdir or "/"
    parent = os.getpid()

    def setup() -> None:
        if spec.netns_fd is not None:
            _libc_check(_libc.setns(spec.netns_fd, CLONE_NEWNET), "setns")
        if spec.chroot:
            _isolated_setup(spec, root, status_fd, sim_pidfd, console_fd)
            return
        if spec.terminal:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        os.chdir(os.path.join(root, os.fsencode(workdir.lstrip("/"))))
        if spec.identity is not None:
            os.setgroups(list(spec.identity.groups))
            os.setgid(spec.identity.gid)
            os.setuid(spec.identity.uid)
        # last: a credential change clears it. Dies with the simulator, even on SIGKILL.
        _libc_check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
        if os.getppid() != parent:
            os._exit(PARENT_GONE_STATUS)

    return setup


def _isolated_setup(
    spec: LaunchSpec, root: bytes, status_fd: int, sim_pidfd: int, console_fd: int
) -> None:
    """A container's init (new namespaces, then the forwarding init forks off) or an exec'd
    process (joins them); then the working directory, capabilities and identity."""
    # the forwarding init and an exec'd process die with the simulator (no credential change
    # follows for the former; the latter sets it again below)
    _libc_check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    if not isolation.parent_alive(sim_pidfd):
        os._exit(PARENT_GONE_STATUS)
    if spec.namespaces is not None:
        isolation.join_container(spec.namespaces)
        if spec.terminal:
            isolation.container_terminal(console_fd, keep_stderr=spec.separate_stderr)
    else:
        binds = [(str(b.source), b.path, b.read_only) for b in spec.binds]
        isolation.enter_container(root, binds, spec.hostname)
        if spec.terminal:  # made by the init: it is the session leader the terminal belongs to
            isolation.container_terminal(console_fd, keep_stderr=spec.separate_stderr)
        isolation.fork_init(status_fd)  # from here on: the container's process, pid 2
    os.chdir(spec.workdir or "/")
    identity = spec.identity or Identity(0, 0, ())
    caps = spec.capabilities
    isolation.drop_privileges(
        isolation.capability_mask(None) if caps is None else caps,
        identity.uid,
        identity.gid,
        identity.groups,
        no_new_privileges=spec.no_new_privileges,
    )
    # its parent is the forwarding init (or the simulator): dies with it
    _libc_check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    isolation.mark_pre_exec()


def _check_workdir(spec: LaunchSpec) -> None:
    """The working directory must exist, as the container sees it (inside its root)."""
    if not spec.chroot:
        if not (spec.root / (spec.workdir or "/").lstrip("/")).is_dir():
            raise FileNotFoundError(errno.ENOENT, "working directory does not exist", spec.workdir)
        return
    root = os.open(spec.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.close(isolation.resolve_in_root(root, spec.workdir or "/", os.O_PATH | os.O_DIRECTORY))
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(
            errno.ENOENT, "working directory does not exist", spec.workdir
        ) from None
    finally:
        os.close(root)


@dataclass(eq=False)
class SimProcess:
    """One running process and the host ends of its stdio."""

    popen: subprocess.Popen[bytes]
    terminal: bool
    stdin_fd: int | None  # pipe write end or pty master; None once closed
    stdout_fd: int  # pipe read end or pty master
    stderr_fd: int | None
    pidfd: int
    status_fd: int | None = None  # an isolated init's report of its container process's status
    namespaces: Namespaces | None = None  # an isolated init's namespaces, for exec'd processes
    _main_pid: int | None = None
    _reported: int | None = None  # the status an isolated init reported
    _stdin_send: MemoryObjectSendStream[bytes | None] = field(init=False)
    _stdin_recv: MemoryObjectReceiveStream[bytes | None] = field(init=False)
    returncode: int | None = None
    stdin_limit: int | None = None  # most bytes of stdin pending at once; the excess is dropped
    _stdin_open: bool = True
    _stdin_pending: int = 0

    def __post_init__(self) -> None:
        self._stdin_send, self._stdin_recv = anyio.create_memory_object_stream[bytes | None](
            math.inf
        )

    @property
    def pid(self) -> int:
        """The pid of the process the simulator started: for an isolated container init, the
        forwarding init of its PID namespace (signals sent to it reach the container's process;
        its process group is the container's)."""
        return self.popen.pid

    @property
    def main_pid(self) -> int:
        """The host pid of the program itself (below an isolated init: its PID 2)."""
        if self.status_fd is None:
            return self.popen.pid
        if self._main_pid is None and self.returncode is None:
            self._main_pid = isolation.ns_child_pid(self.popen.pid)
        return self._main_pid if self._main_pid is not None else self.popen.pid

    def write_stdin(self, data: bytes) -> None:
        """Queue bytes for the process's stdin; dropped once stdin is closed or it exited.

        With ``stdin_limit``, bytes beyond that many pending (not yet written) are dropped.
        """
        if self.returncode is not None or not self._stdin_open:
            return
        if self.stdin_limit is not None:
            data = data[: max(self.stdin_limit - self._stdin_pending, 0)]
            if len(data) == 0:
                return
        self._stdin_pending += len(data)
        self._stdin_send.send_nowait(data)

    def close_stdin(self) -> None:
        """Close stdin after the queued bytes are written (non-terminal processes)."""
        if self.returncode is None and self._stdin_open:
            self._stdin_open = False
            self._stdin_send.send_nowait(None)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process; raises ProcessLookupError when it is gone."""
        if self.returncode is not None:
            raise ProcessLookupError(errno.ESRCH, "process has exited")
        os.kill(self.pid, signum)

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the process's whole process group (its session)."""
        if self.returncode is not None:
            raise ProcessLookupError(errno.ESRCH, "process has exited")
        if self.status_fd is not None:  # the forwarding init sends it to the group, once
            isolation.sigqueue(self.pid, signum)
        else:
            os.killpg(self.pid, signum)

    def kill_group_quietly(self) -> None:
        """SIGKILL the process group, ignoring a group that is already gone."""
        kill_group_quietly(self.pid)

    def resize(self, rows: int, columns: int) -> None:
        """Set the pty window size (TIOCSWINSZ); the process gets SIGWINCH."""
        if not self.terminal or self.stdin_fd is None:
            raise OSError(errno.ENOTTY, "not a terminal process")
        fcntl.ioctl(self.stdin_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    async def run(
        self,
        sink: OutputSink,
        stdio_seq: int,
        stderr_seq: int,
        on_exit: Callable[[], None] | None = None,
    ) -> int:
        """Pump output to ``sink`` and stdin from the queue until exit; return the raw status.

        The status is ``Popen.returncode``: the exit code, or ``-N`` when killed by signal N.
        ``on_exit`` is called as soon as the process has exited, before the output still in the
        pipes is drained (up to DRAIN_GRACE seconds: a background child may hold them open).
        """
        done_out = anyio.Event()
        done_err = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, self.stdout_fd, stdio_seq, sink, done_out)
                if self.stderr_fd is not None:
                    tg.start_soon(self._pump, self.stderr_fd, stderr_seq, sink, done_err)
                else:
                    done_err.set()
                tg.start_soon(self._feed_stdin)
                if self.status_fd is not None:
                    await self._wait_isolated_exit(on_exit)
                else:
                    await anyio.wait_readable(self.pidfd)
                    self.popen.poll()
                    if on_exit is not None:
                        on_exit()
                with anyio.move_on_after(DRAIN_GRACE):
                    await done_out.wait()
                    await done_err.wait()
                tg.cancel_scope.cancel()
        finally:
            isolated = self.status_fd is not None
            self._close_fds()
            if self.popen.poll() is None:  # cancelled before exit, or a killed isolated init
                self.kill_group_quietly()
                if isolated:
                    # its namespace ends only once we reaped the processes exec'd into it:
                    # waiting here could wait for ourselves. Reaped later, without blocking.
                    _UNREAPED.append(self.popen)
                else:
                    self.popen.wait()
            _reap_unreaped()
            reported = self._reported
            if reported is None:
                reported = self.popen.returncode
            self.returncode = -signal.SIGKILL if reported is None else reported
        return self.returncode

    async def _wait_isolated_exit(self, on_exit: Callable[[], None] | None) -> None:
        """An isolated init reports its container process's status, then waits to be killed:
        the simulator reacts to the exit (``on_exit``) before the namespace's other processes
        die, in the order it would without a namespace."""
        assert self.status_fd is not None
        await anyio.wait_readable(self.status_fd)
        try:
            data = os.read(self.status_fd, isolation.STATUS_SIZE)
        except OSError:
            data = b""
        if len(data) == isolation.STATUS_SIZE:  # else: the init itself was killed
            (status,) = struct.unpack(isolation.STATUS_FORMAT, data)
            self._reported = os.waitstatus_to_exitcode(status)
        if on_exit is not None:
            on_exit()
        try:
            os.kill(self.pid, signal.SIGKILL)  # the namespace goes with its init
        except ProcessLookupError:
            pass

    async def _pump(self, fd: int, seq: int, sink: OutputSink, done: anyio.Event) -> None:
        try:
            while True:
                await anyio.wait_readable(fd)
                try:
                    data = os.read(fd, READ_CHUNK)
                except BlockingIOError:
                    continue
                except OSError as exc:  # EIO: the pty's last slave end closed
                    if exc.errno != errno.EIO:
                        log.warning("reading output of pid %d: %s", self.pid, exc)
                    return
                if not data:
                    return
                await sink(seq, data)
        finally:
            done.set()

    async def _feed_stdin(self) -> None:
        async for data in self._stdin_recv:
            fd = self.stdin_fd
            if fd is None:
                return
            if data is None:
                if not self.terminal:
                    os.close(fd)
                    self.stdin_fd = None
                return
            view = memoryview(data)
            while view:
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    await anyio.wait_writable(fd)
                    continue
                except OSError as exc:  # EPIPE: the reader is gone; discard the rest
                    log.debug("stdin of pid %d: %s", self.pid, exc)
                    return
                view = view[n:]
                self._stdin_pending -= n

    def _close_fds(self) -> None:
        self._stdin_open = False
        self._stdin_send.close()
        self._stdin_recv.close()
        fds = {self.stdout_fd, self.pidfd}
        if self.status_fd is not None:
            fds.add(self.status_fd)
        if self.namespaces is not None:
            self.namespaces.close()
            self.namespaces = None
        if self.stdin_fd is not None:
            fds.add(self.stdin_fd)
        if self.stderr_fd is not None:
            fds.add(self.stderr_fd)
        self.stdin_fd = None
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def spawn(spec: LaunchSpec) -> SimProcess:
    """Start the process described by ``spec``.

    Raises OSError (FileNotFoundError for a missing executable or working directory,
    PermissionError, ...) or subprocess.SubprocessError when the child setup failed.
    """
    _check_workdir(spec)
    _reap_unreaped()
    parent_fds: list[int] = []
    child_fds: list[int] = []
    status_fd: int | None = None
    console: socket.socket | None = None
    try:
        stderr_r: int | None = None
        if spec.terminal and spec.chroot:
            # the pty is made inside the container (its own devpts), its master sent back here
            console, child_console = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            child_fds.append(child_console.detach())
            master = -1
            slave = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)  # replaced in the child
            child_fds.append(slave)
            stdin_child = stdout_child = stderr_child = slave
            stdin_fd = stdout_fd = master
            if spec.separate_stderr:
                stderr_r, stderr_child = os.pipe()
                parent_fds.append(stderr_r)
                child_fds.append(stderr_child)
        elif spec.terminal:
            master, slave = os.openpty()
            parent_fds.append(master)
            child_fds.append(slave)
            stdin_child = stdout_child = stderr_child = slave
            stdin_fd = stdout_fd = master
            if spec.separate_stderr:
                stderr_r, stderr_child = os.pipe()
                parent_fds.append(stderr_r)
                child_fds.append(stderr_child)
        else:
            stdin_child, stdin_fd = os.pipe()
            stdout_fd, stdout_child = os.pipe()
            stderr_r, stderr_child = os.pipe()
            parent_fds += [stdin_fd, stdout_fd, stderr_r]
            child_fds += [stdin_child, stdout_child, stderr_child]
        new_container = spec.chroot and spec.namespaces is None
        status_w = -1
        if new_container:
            status_fd, status_w = os.pipe2(os.O_CLOEXEC)
            parent_fds.append(status_fd)
            child_fds.append(status_w)
        sim_pidfd = os.pidfd_open(os.getpid())
        child_fds.append(sim_pidfd)
        with (
            isolation.pid_namespace_for_children(
                spec.namespaces.pid if spec.namespaces is not None else None
            )
            if spec.chroot
            else contextlib.nullcontext()
        ):
            popen = subprocess.Popen(
                list(spec.args),
                stdin=stdin_child,
                stdout=stdout_child,
                stderr=stderr_child,
                env=spec.env,
                start_new_session=True,
                # namespaces, mounts, setuid... need a hook in the child
                preexec_fn=_child_setup(
                    spec, status_w, sim_pidfd, child_fds[0] if console is not None else -1
                ),
            )
        if console is not None:
            with console:
                _, fds, _, _ = socket.recv_fds(console, 1, 1)
            if not fds:
                raise OSError(errno.EIO, "the container sent no terminal")
            stdin_fd = stdout_fd = fds[0]
            parent_fds.append(fds[0])
    except BaseException:
        for fd in parent_fds:
            os.close(fd)
        if console is not None:
            console.close()
        raise
    finally:
        for fd in set(child_fds):
            os.close(fd)
    namespaces = None
    try:
        pidfd = os.pidfd_open(popen.pid)
        if new_container:
            namespaces = Namespaces.of_process(popen.pid)
    except OSError:
        popen.kill()
        popen.wait()
        for fd in parent_fds:
            os.close(fd)
        raise
    for fd in set(parent_fds):
        os.set_blocking(fd, False)
    return SimProcess(
        popen=popen,
        terminal=spec.terminal,
        stdin_fd=stdin_fd,
        stdout_fd=stdout_fd,
        stderr_fd=stderr_r,
        pidfd=pidfd,
        status_fd=status_fd,
        namespaces=namespaces,
    )


_UNREAPED: list[subprocess.Popen[bytes]] = []  # killed isolated inits not reaped yet


def _reap_unreaped() -> None:
    """Reap the killed isolated inits that have exited meanwhile (never blocks)."""
    _UNREAPED[:] = [p for p in _UNREAPED if p.poll() is None]


def kill_group_quietly(pgid: int) -> None:
    """SIGKILL process group ``pgid``, ignoring a group that is already gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def exit_status(returncode: int, *, signal_status_zero: bool) -> int:
    """The status an agent reports for ``Popen.returncode``.

    cc-agent reports 128+N for a death by signal N; hyperhq/hyperstart reports 0.
    """
    if returncode >= 0:
        return returncode
    return 0 if signal_status_zero else SIGNAL_EXIT_BASE - returncode
