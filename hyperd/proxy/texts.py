"""The proxy's error texts, exactly as the reference cc-proxy 3.0.23 words them (spec §9).

Clients match on some of these strings, so they live in one place. Texts of our own (for cases
where the reference hangs or crashes instead of answering) are marked as such.
"""

from __future__ import annotations

from typing import Final

from hyperd.errors import ProxyError

NOT_ATTACHED: Final = "client not attached to a vm"
NOT_A_SHIM: Final = "client isn't a shim"
MALFORMED_REGISTER: Final = "malformed RegisterVM command"
NO_CTL_CHANNEL: Final = "No multicast available for CTL channel"  # VM lost
# ours: the reference waits forever for READY / for agent replies
READY_TIMEOUT: Final = "timeout waiting for the VM agent's READY"
AGENT_CLOSED: Final = "EOF"  # the agent closed its channel before READY (Go's io.EOF)

# Go's syscall.Signal descriptions (linux/amd64), used in Signal error texts
SIGNAL_NAMES: Final = (
    "signal 0",
    "hangup",
    "interrupt",
    "quit",
    "illegal instruction",
    "trace/breakpoint trap",
    "aborted",
    "bus error",
    "floating point exception",
    "killed",
    "user defined signal 1",
    "segmentation fault",
    "user defined signal 2",
    "broken pipe",
    "alarm clock",
    "terminated",
    "stack fault",
    "child exited",
    "continued",
    "stopped (signal)",
    "stopped",
    "stopped (tty input)",
    "stopped (tty output)",
    "urgent I/O condition",
    "CPU time limit exceeded",
    "file size limit exceeded",
    "virtual timer expired",
    "profiling timer expired",
    "window changed",
    "I/O possible",
    "power failure",
)


class CommandError(ProxyError):
    """A command failed; ``message`` is the exact ``msg`` of the error response."""


def already_registered(vm_id: str) -> str:
    return f"{vm_id}: container already registered"


def unknown_container(vm_id: str) -> str:
    return f"unknown containerID: {vm_id}"


def unknown_command(name: str) -> str:
    return f"unknown command '{name}'"


def no_tokens_needed(name: str, count: int) -> str:
    return f"{name} doesn't need tokens but {count} token(s) were given"


def too_many_tokens(count: int) -> str:
    return f"expected 0 or 1 token, got {count}"


def unknown_token_hyper(token: str) -> str:
    return f"unknown token {token}"


def prefilled_stdio(value: int) -> str:
    return f"expected process.Stdio to be 0, got {value}"


def prefilled_stderr(value: int) -> str:
    return f"expected process.Stderr to be 0, got {value}"


def shim_timeout(token: str) -> str:
    return f"timeout waiting for shim with token {token}"


def process_timeout(token: str) -> str:
    return f"timeout waiting for process with token {token}"


def agent_error(payload: bytes) -> str:
    return f"ERROR received from VM agent, control msg received : {_text(payload)}"


def unexpected_reply(code: int, expected: int, payload: bytes) -> str:
    return (
        f"CMD ID received {code} not matching expected {expected},"
        f" control msg received : {_text(payload)}"
    )


def message_too_long(total: int) -> str:
    return f"message too long {total}"


def unknown_token_connect(token: str) -> str:
    return f"unknown token: {token}"


def token_claimed(token: str) -> str:
    return f"token already claimed: {token}"


def token_freed(token: str) -> str:
    return f"vm: unknown token {token}"


def invalid_signal(number: int) -> str:
    return f"invalid signal number {number}"


def signal_name(number: int) -> str:
    """Go's description of signal ``number`` (``terminated``, ``window changed``...)."""
    if 0 <= number < len(SIGNAL_NAMES):
        return SIGNAL_NAMES[number]
    return f"signal {number}"


def bad_winsize(columns: int, rows: int) -> str:
    return f"received SIGWINCH but terminal size is invalid ({columns},{rows})"


def size_with_signal(columns: int, rows: int, number: int) -> str:
    return f"received a terminal size ({columns},{rows}) for signal {signal_name(number)}"


def exec_signal(number: int) -> str:
    return (
        f"Could not send the signal {signal_name(number)}: Sending a signal to a process"
        " different from the initial container process is not supported"
    )


def dial_error(path: str, errno_text: str) -> str:
    """Go's net.Dial error for a unix socket path."""
    return f"dial unix {path}: connect: {errno_text}"


def agent_timeout(name: str, seconds: float) -> str:
    """Ours: the reference has no agent reply timeout."""
    return f"timeout waiting for the VM agent's reply to {name} ({seconds:g} s)"


def token_in_use(token: str) -> str:
    """Ours: the reference panics when a token is used for a second process."""
    return f"token {token} already bound to a process"


def no_process(name: str) -> str:
    """Ours: the reference dereferences a nil process and panics."""
    return f"{name} data has no process"


def _text(payload: bytes) -> str:
    return payload.decode("utf-8", "replace")
