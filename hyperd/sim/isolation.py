"""What keeps a simulated container off the host: namespaces, a root of its own, a minimal /dev
and a bounded set of capabilities (used when the simulator runs as root).

A container's init gets new PID, mount, IPC and UTS namespaces; its root is ``pivot_root``-ed
into the container's rootfs (the old root detached, so no chroot escape leads back to the host);
``/proc`` is the container's own; ``/dev`` is a ``nodev`` tmpfs holding only ``null``, ``zero``,
``full``, ``random``, ``urandom`` and ``tty`` (bind mounts of the host's nodes), a private
``devpts`` and ``/dev/shm``; the rootfs and every fsmap volume are ``nodev`` too, so a device node
made with ``mknod`` cannot be opened. Capabilities are limited to Docker's default set (or the
process spec's bounding set), in the bounding set as well, so no exec'd program regains more.
Exec'd processes join the init's namespaces.

Everything that runs in the forked child (between fork and exec) is here: small, synchronous,
and free of locks the parent may have held.

The init of a PID namespace ignores every signal it has no handler for, so the container's own
first process does not run as PID 1: a forked copy of the simulator does (:func:`become_init`),
which forwards signals to the container's process (PID 2), reaps orphans, reports its exit
status through a pipe and exits with it, taking the namespace down with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import select
import signal
import socket
import struct
import termios
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

from hyperd.host.mountsys import RESOLVE_IN_ROOT, bind_fd, openat2

__all__ = [
    "DEFAULT_CAPABILITIES",
    "STATUS_SIZE",
    "CapabilityError",
    "Namespaces",
    "capability_mask",
    "container_terminal",
    "drop_privileges",
    "enter_container",
    "fork_init",
    "join_container",
    "mark_pre_exec",
    "ns_child_pid",
    "parent_alive",
    "pid_namespace_for_children",
    "resolve_in_root",
    "sigqueue",
]

CLONE_NEWNS = 0x00020000  # <sched.h>
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 0x1  # <sys/mount.h>
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
ST_FLAGS_KEPT = {  # statvfs f_flag bit -> mount flag: kept by the nodev remount of the rootfs
    os.ST_RDONLY: MS_RDONLY,
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: 0x400,
    os.ST_NODIRATIME: 0x800,
    os.ST_RELATIME: 0x200000,
}
TIOCSPTLCK = 0x40045431  # <asm/ioctls.h>: (un)lock a pty's slave
TIOCGPTPEER = 0x5441  # open the slave of a pty master (Linux 4.13+)
PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
PR_SET_NAME = 15
PRE_EXEC_NAME = b"hyperd-preexec"  # a container process's name until its exec succeeds
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522  # <linux/capability.h>: two 32-bit words per set
MAX_CAPABILITY = 63  # the bounding set is dropped up to here; higher than any kernel's last cap
SI_USER = 0  # <signal.h> si_code: kill(2)
SI_QUEUE = -1  # sigqueue(3): the simulator's "to the whole process group"
SI_TKILL = -6  # tkill/tgkill
STATUS_FORMAT = "=i"  # the init's report: the raw wait status of the container's process
STATUS_SIZE = struct.calcsize(STATUS_FORMAT)
CONTAINER_PID = 2  # the container's own first process, below the forwarding init
DEV_TMPFS_OPTIONS = b"mode=755,size=65536k"
SHM_OPTIONS = b"mode=1777,size=65536k"
DEVPTS_OPTIONS = b"newinstance,ptmxmode=0666,mode=0620"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")  # what a container's /dev holds
DEV_LINKS = {
    "ptmx": "pts/ptmx",
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

# the capability numbers of <linux/capability.h>, by the names OCI specs use
CAPABILITIES = {
    name: number
    for number, name in enumerate(
        [
            "CHOWN",
            "DAC_OVERRIDE",
            "DAC_READ_SEARCH",
            "FOWNER",
            "FSETID",
            "KILL",
            "SETGID",
            "SETUID",
            "SETPCAP",
            "LINUX_IMMUTABLE",
            "NET_BIND_SERVICE",
            "NET_BROADCAST",
            "NET_ADMIN",
            "NET_RAW",
            "IPC_LOCK",
            "IPC_OWNER",
            "SYS_MODULE",
            "SYS_RAWIO",
            "SYS_CHROOT",
            "SYS_PTRACE",
            "SYS_PACCT",
            "SYS_ADMIN",
            "SYS_BOOT",
            "SYS_NICE",
            "SYS_RESOURCE",
            "SYS_TIME",
            "SYS_TTY_CONFIG",
            "MKNOD",
            "LEASE",
            "AUDIT_WRITE",
            "AUDIT_CONTROL",
            "SETFCAP",
            "MAC_OVERRIDE",
            "MAC_ADMIN",
            "SYSLOG",
            "WAKE_ALARM",
            "BLOCK_SUSPEND",
            "AUDIT_READ",
            "PERFMON",
            "BPF",
            "CHECKPOINT_RESTORE",
        ]
    )
}
# Docker's (and containerd's) default set for a container's processes
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class CapabilityError(ValueError):
    """A capability name the simulator does not know."""


def capability_mask(names: Iterable[str] | None) -> int:
    """The bit mask of capability ``names`` (``CAP_X`` or ``X``); ``None``: Docker's defaults.

    Raises :class:`CapabilityError` naming an unknown capability.
    """
    mask = 0
    for name in DEFAULT_CAPABILITIES if names is None else names:
        key = name.upper().removeprefix("CAP_")
        if key not in CAPABILITIES:
            raise CapabilityError(f"unknown capability {name!r}")
        mask |= 1 << CAPABILITIES[key]
    return mask


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(
    source: bytes | None, target: str, fstype: bytes | None, flags: int, data: bytes | None = None
) -> None:
    _check(
        _libc.mount(source, os.fsencode(target), fstype, ctypes.c_ulong(flags), data),
        f"mount {target}",
    )


@dataclass(frozen=True, slots=True)
class Namespaces:
    """Open fds of a container's PID, mount, IPC and UTS namespaces (for exec'd processes)."""

    pid: int
    mnt: int
    ipc: int
    uts: int

    @classmethod
    def of_process(cls, pid: int) -> Namespaces:
        """The namespaces process ``pid`` lives in. Raises OSError."""
        fds: list[int] = []
        try:
            for kind in ("pid", "mnt", "ipc", "uts"):
                fds.append(os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(*fds)

    def close(self) -> None:
        for fd in (self.pid, self.mnt, self.ipc, self.uts):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def pid_namespace_for_children(join: int | None) -> Iterator[None]:
    """Within the block, children forked by the calling thread start in a new PID namespace
    (``join`` None: they are its init) or in the namespace open at ``join``; afterwards they
    start in the caller's own again. Only the calling thread is affected."""
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if join is None:
            _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        else:
            _check(_libc.setns(join, CLONE_NEWPID), "setns(pid)")
        try:
            yield
        finally:
            _check(_libc.setns(own, CLONE_NEWPID), "setns(own pid namespace)")
    finally:
        os.close(own)


# ---- in the child, between fork and exec --------------------------------------------------


def resolve_in_root(root_fd: int, path: str, flags: int = os.O_PATH) -> int:
    """Open ``path`` as the container would see it: in its root, every symlink resolved inside
    it (``RESOLVE_IN_ROOT``), so nothing leads out. Raises OSError."""
    return openat2(root_fd, path.lstrip("/") or ".", flags, RESOLVE_IN_ROOT)


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def enter_container(root: bytes, binds: Sequence[tuple[str, str, bool]], hostname: str) -> None:
    """Make this process (the init of a new PID namespace) the container: new mount, IPC and
    UTS namespaces, ``/proc``, a minimal ``/dev``, the fsmap ``binds`` (host source, path in
    the container, read-only) and ``pivot_root`` into ``root``. Raises OSError."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    _mount(b"none", "/", None, MS_REC | MS_PRIVATE)
    if hostname:
        name = hostname.encode()
        _check(_libc.sethostname(name, ctypes.c_size_t(len(name))), "sethostname")
    _mount(root, os.fsdecode(root), None, MS_BIND | MS_REC)  # pivot_root needs a mount point
    kept = 0
    vfs = os.statvfs(root)
    for bit, flag in ST_FLAGS_KEPT.items():
        if vfs.f_flag & bit:
            kept |= flag
    _mount(None, os.fsdecode(root), None, MS_BIND | MS_REMOUNT | MS_NODEV | kept)
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for source, path, read_only in binds:
            _bind(root_fd, source, path, read_only)
        _mount_proc(root_fd)
        _make_dev(root_fd)
    finally:
        os.close(root_fd)
    os.chdir(root)
    try:
        _pivot_root(b".", b".")
        _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # the current root is an initramfs (a guest booted from an initrd), which cannot be
        # pivoted away from: move the container's root over it, as switch_root does
        _mount(b".", "/", None, MS_MOVE)
        os.chroot(".")
    os.chdir("/")


def _bind(root_fd: int, source: str, path: str, read_only: bool) -> None:
    src = os.open(source, os.O_PATH | os.O_CLOEXEC)
    try:
        target = resolve_in_root(root_fd, path)
        try:
            bind_fd(src, target, readonly=read_only, nodev=True)
        finally:
            os.close(target)
    finally:
        os.close(src)


def _mount_proc(root_fd: int) -> None:
    try:
        fd = resolve_in_root(root_fd, "proc", os.O_PATH | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return  # a root without /proc gets none
    try:
        _mount(b"proc", f"/proc/self/fd/{fd}", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    finally:
        os.close(fd)


def _make_dev(root_fd: int) -> None:
    try:
        fd = resolve_in_root(root_fd, "dev", os.O_PATH | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        _mount(b"tmpfs", f"/proc/self/fd/{fd}", b"tmpfs", MS_NOSUID | MS_NODEV, DEV_TMPFS_OPTIONS)
        dev = _fd_path(fd)  # the path now crosses into the fresh tmpfs only this process sees
    finally:
        os.close(fd)
    for name in DEVICES:
        host = f"/dev/{name}"
        if not os.path.exists(host):
            continue
        node = os.path.join(dev, name)
        os.close(os.open(node, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        _mount(host.encode(), node, None, MS_BIND)
    for sub, fstype, options, flags in (
        ("pts", b"devpts", DEVPTS_OPTIONS, MS_NOSUID | MS_NOEXEC),
        ("shm", b"tmpfs", SHM_OPTIONS, MS_NOSUID | MS_NODEV | MS_NOEXEC),
    ):
        os.mkdir(os.path.join(dev, sub), 0o755)
        _mount(fstype, os.path.join(dev, sub), fstype, flags, options)
    for name, target in DEV_LINKS.items():
        os.symlink(target, os.path.join(dev, name))


def _pivot_root(new_root: bytes, put_old: bytes) -> None:
    number = _PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(
            errno.ENOSYS, f"pivot_root: unknown system call number on {platform.machine()}"
        )
    if _libc.syscall(ctypes.c_long(number), new_root, put_old) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root: {os.strerror(err)}")


def container_terminal(console_fd: int, *, keep_stderr: bool) -> None:
    """Make a pty on the container's own devpts, put its slave on stdin, stdout (and stderr
    unless ``keep_stderr``) as the controlling terminal, and send the master over the unix
    socket ``console_fd`` (as runc's console socket does). Raises OSError."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))  # unlockpt
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
        for target in (0, 1) if keep_stderr else (0, 1, 2):
            os.dup2(slave, target)
        if slave > 2:
            os.close(slave)
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        with socket.socket(fileno=console_fd) as console:
            socket.send_fds(console, [b"t"], [master])
    finally:
        os.close(master)


def join_container(ns: Namespaces) -> None:
    """Enter a running container's mount, IPC and UTS namespaces (the PID namespace was chosen
    at fork); the root and working directory become the container's ``/``. Raises OSError."""
    for fd, kind, what in (
        (ns.ipc, CLONE_NEWIPC, "ipc"),
        (ns.uts, CLONE_NEWUTS, "uts"),
        (ns.mnt, CLONE_NEWNS, "mnt"),
    ):
        _check(_libc.setns(fd, kind), f"setns({what})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_privileges(
    caps: int, uid: int, gid: int, groups: Sequence[int], *, no_new_privileges: bool
) -> None:
    """Limit the bounding set to ``caps``, take the identity, and keep ``caps`` as the effective
    and permitted sets (a root process; a non-root one keeps none). Raises OSError."""
    for cap in range(MAX_CAPABILITY + 1):
        if not caps & (1 << cap) and _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == errno.EINVAL:  # beyond this kernel's last capability
                break
            _check(-1, f"dropping capability {cap}")
    if no_new_privileges:
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    os.setgroups(list(groups))
    os.setgid(gid)
    os.setuid(uid)
    if uid == 0:
        header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
        words = (_CapData * 2)()
        for i in range(2):
            word = (caps >> (32 * i)) & 0xFFFFFFFF
            words[i].effective = words[i].permitted = word
            words[i].inheritable = 0
        _check(_libc.capset(ctypes.byref(header), ctypes.byref(words)), "capset")


def fork_init(status_fd: int) -> None:
    """Fork: the parent stays behind as the PID namespace's init (:func:`become_init`, never
    returns), the child returns to become the container's process (PID 2)."""
    catchable = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, catchable)
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return
    become_init(child, status_fd, catchable)


def become_init(child: int, status_fd: int, catchable: set[signal.Signals]) -> NoReturn:
    """The loop of the namespace's init: forward kill()s to ``child``, and a sigqueue() (the
    simulator's "to the process group") to the whole group; reap orphans. When ``child`` has
    exited, write its raw wait status to ``status_fd`` and wait for the simulator's SIGKILL
    (the parent-death signal covers a simulator that is gone)."""
    try:
        os.closerange(0, status_fd)
        os.closerange(status_fd + 1, os.sysconf("SC_OPEN_MAX"))
        for signum in catchable:  # not SIG_DFL: the kernel drops those for a namespace init
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, _ignore)
        while True:
            info = signal.sigwaitinfo(catchable)
            if info.si_signo == signal.SIGCHLD:
                executed = child > 0 and _executed(child)
                status = _reap(child)
                if status is not None:
                    os.write(status_fd, struct.pack(STATUS_FORMAT, status))
                    os.close(status_fd)
                    if not executed:  # the simulator waits for us in Popen: exit now
                        os._exit(0)
                    # wait for the simulator's SIGKILL: it handles the exit before the
                    # namespace's other processes die with us, as without a namespace
                    child = -1
            elif info.si_pid == 1 or child < 0:
                continue  # our own killpg came back to us, or nobody is left to forward to
            elif info.si_code == SI_QUEUE:
                with contextlib.suppress(OSError):
                    os.killpg(os.getpgid(0), info.si_signo)
            elif info.si_code in (SI_USER, SI_TKILL):
                with contextlib.suppress(OSError):
                    os.kill(child, info.si_signo)
            # else: sent by the kernel (the terminal's SIGINT, SIGWINCH...), which already
            # reached the child's process group
    finally:
        os._exit(1)


def _executed(child: int) -> bool:
    """Whether ``child``, which has exited (still a zombie), had exec'd its program: its name
    is no longer :data:`PRE_EXEC_NAME` (set before exec; exec replaces it)."""
    try:
        if os.waitid(os.P_PID, child, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return False
        with open(f"/proc/{child}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.find(b"(") + 1 : stat.rfind(b")")] != PRE_EXEC_NAME


def mark_pre_exec() -> None:
    """Name this process :data:`PRE_EXEC_NAME` until exec renames it (see :func:`_executed`)."""
    _libc.prctl(PR_SET_NAME, PRE_EXEC_NAME, 0, 0, 0)


def _ignore(signum: int, frame: object) -> None:
    """A handler that is never run (the signals are blocked and waited for)."""


def _reap(child: int) -> int | None:
    """Reap every exited process; the raw status of ``child`` if it was one of them."""
    found = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found
        if pid == 0:
            return found
        if pid == child:
            found = status


def parent_alive(pidfd: int) -> bool:
    """Whether the process open at ``pidfd`` still runs (its pidfd is not readable yet).

    ``getppid()`` cannot tell across PID namespaces: the parent is outside, so it reads 0.
    """
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


def ns_child_pid(host_pid: int, ns_pid: int = CONTAINER_PID) -> int | None:
    """The host pid of the child of ``host_pid`` that is ``ns_pid`` in its own PID namespace
    (the container's process below the forwarding init), or None."""
    try:
        with open(f"/proc/{host_pid}/task/{host_pid}/children", "rb") as f:
            children = f.read().split()
    except OSError:
        return None
    for child in children:
        try:
            with open(f"/proc/{int(child)}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"NSpid:"):
                        if int(line.split()[-1]) == ns_pid:
                            return int(child)
                        break
        except (OSError, ValueError):
            continue
    return None


def sigqueue(pid: int, signum: int) -> None:
    """``sigqueue(pid, signum, 0)``: a signal with ``si_code`` SI_QUEUE. Raises OSError."""
    if _libc.sigqueue(pid, signum, ctypes.c_void_p(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
