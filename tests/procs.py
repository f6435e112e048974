"""Starting and stopping our programs in tests: ``--ready-fd`` readiness, SIGTERM then SIGKILL.

Every program of the project (hyperd-sim, hyperd-proxy) writes ``ready\\n`` to the descriptor
given with ``--ready-fd`` once it listens; :func:`spawn_ready` waits for that line with a
deadline instead of polling for socket files.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
from typing import IO, Any

READY_LINE = b"ready\n"
# seconds for a program to listen: a generous bound that only a hung start hits (seen: a Python
# program took over 20 s to start on 2 cores at load average 25)
READY_DEADLINE = 60.0
EXIT_DEADLINE = 10.0  # seconds for a program to exit after SIGTERM before it is killed


def spawn_ready(
    argv: list[str],
    *,
    stderr: int | IO[Any] | None = None,
    env: dict[str, str] | None = None,
    deadline: float = READY_DEADLINE,
) -> subprocess.Popen[bytes]:
    """Start ``argv + ["--ready-fd", FD]`` and return once it wrote ``ready``.

    Raises RuntimeError (after killing the process) when the line does not come in time.
    """
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [*argv, "--ready-fd", str(write_fd)],
        pass_fds=(write_fd,),
        stderr=stderr,
        env=None if env is None else {**os.environ, **env},
    )
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], deadline)
        line = os.read(read_fd, 64) if ready else b""
    finally:
        os.close(read_fd)
    if line != READY_LINE:
        proc.kill()
        _, err = proc.communicate()
        detail = err.decode(errors="replace") if err else ""
        raise RuntimeError(f"{' '.join(argv[:3])} did not get ready: {line!r} {detail}")
    return proc


def stop(proc: subprocess.Popen[bytes], deadline: float = EXIT_DEADLINE) -> int:
    """SIGTERM ``proc``, wait up to ``deadline``, then SIGKILL; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(deadline)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
