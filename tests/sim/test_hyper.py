"""hyperd-sim in the hyperhq dialect, checked against the conformance transcripts' behaviour."""

from __future__ import annotations

import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protocol.hyperstart import (
    HYPER,
    Code,
    ExecCommand,
    KillCommand,
    NextAck,
    Pod,
    RemoveCommand,
    Reply,
    SignalCommand,
    WindowSizeMessage,
    encode_ctl,
    encode_message,
)
from tests.sim.hostclient import HostClient, Sim, container, process, start_pod, start_sim

SIGNALPROCESS = 24
AddRootfs = Callable[[Sim, str], Path]


@pytest.fixture
def hsim(short_tmp: Path) -> Iterator[Sim]:
    with start_sim(short_tmp, dialect=HYPER) as s:
        yield s


@pytest.fixture
def client(hsim: Sim) -> Iterator[HostClient]:
    with hsim.client() as c:
        yield c


def _ctl_kinds(c: HostClient) -> list[str]:
    """The ctl log as short strings: NEXT(n), ACK, ERROR."""
    kinds = []
    for ev in c.ctl_log:
        if isinstance(ev, NextAck):
            kinds.append(f"NEXT({ev.count})")
        elif isinstance(ev, Reply):
            kinds.append("ACK" if ev.ok else "ERROR")
    return kinds


def test_version_next_and_unknown_codes(client: HostClient) -> None:
    client.wait_ready()
    version = client.command(Code.VERSION)
    assert version.ok and version.payload == struct.pack(">I", 4244)
    assert client.command(Code.PING).ok
    assert client.command(99) == Reply(99, False, b"")
    assert client.command(99, b'{"x":1}') == Reply(99, False, b"")
    assert client.command(Code.GETPOD) == Reply(Code.GETPOD, False, b"")  # deprecated
    assert client.command(Code.NEXT, struct.pack(">I", 8)) == Reply(Code.NEXT, False, b"")
    assert client.command(Code.READY).ok
    assert client.command(Code.ONLINECPUMEM).ok
    assert _ctl_kinds(client) == [
        "NEXT(8)", "ACK", "NEXT(8)", "ACK", "NEXT(8)", "ERROR", "NEXT(8)", "NEXT(7)", "ERROR",
        "NEXT(8)", "ERROR", "NEXT(8)", "NEXT(4)", "ERROR", "NEXT(8)", "ACK", "NEXT(8)", "ACK",
    ]  # fmt: skip


def test_pipelined_commands_interleave_next_and_replies(client: HostClient) -> None:
    client.wait_ready()
    client.ctl_sock.sendall(
        client.ctl.send_command(Code.VERSION)
        + client.ctl.send_command(Code.PING)
        + client.ctl.send_command(99)
    )
    client.wait_for(lambda: len(client.replies) == 3, what="three replies")
    assert _ctl_kinds(client) == ["NEXT(8)", "ACK", "NEXT(8)", "ACK", "NEXT(8)", "ERROR"]


def test_split_body_gets_one_next_per_read(client: HostClient) -> None:
    client.wait_ready()
    body = encode_message(Pod(hostname="hs-split", share_dir="share_dir"), HYPER)
    frame = client.ctl.send_command(Code.STARTPOD, body)
    client.ctl_sock.sendall(frame[:18])
    client.wait_for(lambda: client.nexts == [8, 10], what="NEXT(8), NEXT(10)")
    client.ctl_sock.sendall(frame[18:])
    assert client.reply().ok
    assert client.nexts == [8, 10, len(frame) - 18]


def test_container_echo_exit_event(hsim: Sim, client: HostClient, add_rootfs: AddRootfs) -> None:
    add_rootfs(hsim, "c1")
    start_pod(client)
    script = "echo out; echo err >&2; exit 3"
    client.ok(Code.NEWCONTAINER, container("c1", process(["sh", "-c", script], 1, 2, pid="init")))
    event = client.wait_event("init")
    assert (event.container, event.event, event.status) == ("c1", "finished", 3)
    exact = b'{"container":"c1","process":"init","event":"finished","status":3}'
    assert encode_ctl(23, exact) in client.ctl_raw
    out = client.output(1)
    assert bytes(out.data) == b"out\n" and out.eof and out.status is None
    client.settle(0.1)
    assert bytes(client.output(2).data) == b"err\n" and not client.output(2).eof
    # the container was freed when its init exited
    assert client.command(Code.REMOVECONTAINER, RemoveCommand(container="c1")) == Reply(
        Code.REMOVECONTAINER, False, b""
    )
    assert client.command(Code.DESTROYPOD).ok


def test_strict_keys(hsim: Sim, client: HostClient, add_rootfs: AddRootfs) -> None:
    add_rootfs(hsim, "c1")
    start_pod(client)
    cc_body = encode_message(container("c1", process(["true"], 1, 2, pid="init")))  # CC keys
    assert client.command(Code.NEWCONTAINER, cc_body) == Reply(Code.NEWCONTAINER, False, b"")
    bad_process = (
        b'{"id":"c1","rootfs":"rootfs","image":"c1","process":{"id":"init","stdio":1,'
        b'"stderr":2,"capabilities":null,"args":["true"],"workdir":"/"}}'
    )
    hang = client.command(Code.NEWCONTAINER, bad_process)
    assert not hang.ok and b"capabilities" in hang.payload  # real agent: hangs
    assert client.command(Code.PING).ok


def test_stdin_cat_and_unknown_seq(hsim: Sim, client: HostClient, add_rootfs: AddRootfs) -> None:
    add_rootfs(hsim, "c1")
    start_pod(client)
    client.ok(Code.NEWCONTAINER, container("c1", process(["cat"], 1, 2, pid="init")))
    client.stdin(77, b"hello?")
    client.wait_for(lambda: client.output(77).eof, what="goodbye EOF on seq 77")
    client.stdin(1, b"ping\n")
    client.wait_for(lambda: bytes(client.output(1).data) == b"ping\n", what="echo")
    client.stdin(1, b"")
    assert client.wait_event("init").status == 0
    client.tty_eofs.clear()
    client.stdin(1, b"late\n")
    client.wait_for(lambda: client.tty_eofs == [1], what="EOF for a finished seq")


def test_exec_terminal_winsize_and_signals(
    hsim: Sim, client: HostClient, add_rootfs: AddRootfs
) -> None:
    add_rootfs(hsim, "c1")
    start_pod(client)
    client.ok(Code.NEWCONTAINER, container("c1", process(["sleep", "30"], 1, 2, pid="init")))
    script = "read x; stty size; echo to-stderr >&2; exit 5"
    term = process(["sh", "-c", script], 7, pid="ex3", terminal=True)
    client.ok(Code.EXECCMD, ExecCommand(container="c1", process=term))
    client.ok(Code.WINSIZE, WindowSizeMessage(container="c1", process="ex3", row=33, column=111))
    cc_form = client.command(Code.WINSIZE, b'{"seq":7,"row":1,"column":1}')
    assert not cc_form.ok
    client.stdin(7, b"go\n")
    assert client.wait_event("ex3").status == 5
    assert b"33 111\r\n" in client.output(7).data and b"to-stderr\r\n" in client.output(7).data
    not_term = client.command(
        Code.WINSIZE, WindowSizeMessage(container="c1", process="init", row=24, column=80)
    )
    assert not not_term.ok
    # ^D, not an empty frame, ends terminal input
    cat = process(["cat"], 19, pid="ex6", terminal=True)
    client.ok(Code.EXECCMD, ExecCommand(container="c1", process=cat))
    client.stdin(19, b"abc\n")
    client.wait_for(lambda: client.output(19).data.count(b"abc\r\n") == 2, what="echo")
    client.stdin(19, b"")
    client.settle(0.2)
    assert not client.output(19).eof
    client.stdin(19, b"\x04")
    assert client.wait_event("ex6").status == 0
    # SIGNALPROCESS on an exec; signal deaths report status 0
    client.ok(
        Code.EXECCMD, ExecCommand(container="c1", process=process(["sleep", "30"], 5, 6, pid="ex2"))
    )
    client.ok(SIGNALPROCESS, SignalCommand(container="c1", process="ex2", signal=15))
    assert client.wait_event("ex2").status == 0
    missing = client.command(SIGNALPROCESS, SignalCommand(container="c1", process="zz", signal=15))
    assert not missing.ok
    # KILLCONTAINER: NUL-terminated error strings; the init's death takes the others along
    client.ok(
        Code.EXECCMD,
        ExecCommand(container="c1", process=process(["sleep", "30"], 13, 14, pid="ex5")),
    )
    nobody = client.command(Code.KILLCONTAINER, KillCommand(container="c9", signal=15))
    assert nobody.payload == b"no such container\0"
    bad = client.command(Code.KILLCONTAINER, KillCommand(container="c1", signal=12345))
    assert bad.payload == b"invalid signal\0"
    running = client.command(Code.REMOVECONTAINER, RemoveCommand(container="c1"))
    assert running == Reply(Code.REMOVECONTAINER, False, b"")
    client.ok(Code.KILLCONTAINER, KillCommand(container="c1", signal=signal.SIGTERM))
    assert client.wait_event("init").status == 0
    assert client.wait_event("ex5").status == 0
    assert client.output(1).eof and client.output(13).eof
    # all EOFs first, then the events, init's first (as recorded from the real agent)
    assert client.tty_eofs[-2:] == [1, 13]
    assert [e.process for e in client.events[-2:]] == ["init", "ex5"]


def test_exec_of_missing_binary_exits_127(
    hsim: Sim, client: HostClient, add_rootfs: AddRootfs
) -> None:
    add_rootfs(hsim, "c1")
    start_pod(client)
    client.ok(Code.NEWCONTAINER, container("c1", process(["sleep", "30"], 1, 2, pid="init")))
    client.ok(Code.EXECCMD, ExecCommand(container="c1", process=process(["/nope"], 3, 4, pid="ex")))
    assert client.wait_event("ex").status == 127
    assert b"exec failed: No such file or directory" in client.output(4).data


def test_exec_while_idless_process_runs_is_refused(
    hsim: Sim, client: HostClient, add_rootfs: AddRootfs
) -> None:
    add_rootfs(hsim, "c1")
    start_pod(client)
    idless = (
        b'{"id":"c1","rootfs":"rootfs","image":"c1","process":{"terminal":false,"stdio":1,'
        b'"stderr":2,"args":["sleep","30"],"workdir":"/"}}'
    )
    client.ok(Code.NEWCONTAINER, idless)
    r = client.command(
        Code.EXECCMD, ExecCommand(container="c1", process=process(["true"], 3, 4, pid="ex"))
    )
    assert not r.ok and b"crash" in r.payload


def test_destroypod_defers_ack_until_exit(
    hsim: Sim, client: HostClient, add_rootfs: AddRootfs
) -> None:
    add_rootfs(hsim, "c1")
    start_pod(client)
    client.ok(Code.NEWCONTAINER, container("c1", process(["sleep", "30"], 17, 18, pid="init")))
    assert client.command(Code.DESTROYPOD).ok
    assert any(e.process == "init" for e in client.events)  # the event came before the ACK
    assert client.output(17).eof


def test_stdin_beyond_512_pending_bytes_is_dropped(
    hsim: Sim, client: HostClient, add_rootfs: AddRootfs
) -> None:
    add_rootfs(hsim, "c1")
    start_pod(client)
    client.ok(Code.NEWCONTAINER, container("c1", process(["cat"], 1, 2, pid="init")))
    data = b"".join(b"%04d" % i for i in range(1021))  # 4084 bytes: a 4096-byte frame
    client.stdin(1, data)
    client.wait_for(lambda: len(client.output(1).data) >= 512, what="512 bytes echoed")
    client.settle(0.3)
    assert bytes(client.output(1).data) == data[:512]
    client.stdin(1, b"more\n")  # later frames get through again
    client.wait_for(lambda: client.output(1).data.endswith(b"more\n"), what="echo")
    too_big = data + b"x" * 16  # a 4112-byte frame: the real agent dies; the sim drops the link
    client.stdin(1, too_big)
    client.wait_for(lambda: client.tty_closed, what="tty closed")
    assert client.command(Code.PING).ok


def test_files_and_second_startpod(hsim: Sim, client: HostClient, add_rootfs: AddRootfs) -> None:
    root = add_rootfs(hsim, "c1")
    start_pod(client)
    client.ok(Code.NEWCONTAINER, container("c1", process(["sleep", "30"], 1, 2, pid="init")))
    client.ok(Code.WRITEFILE, b'{"container":"c1","file":"/tmp/hello"}hello\x00world')
    assert (root / "tmp" / "hello").read_bytes() == b"hello\x00world"
    assert client.ok(Code.READFILE, b'{"container":"c1","file":"/tmp/hello"}') == b"hello\0world"
    outside = client.command(Code.READFILE, b'{"container":"c1","file":"../../../etc/passwd"}')
    assert not outside.ok
    # a symlink in the rootfs is resolved inside it: no host file is read or written
    (root / "tmp" / "link").symlink_to(root.parent / "host-file")
    (root.parent / "host-file").write_text("host\n")
    assert not client.command(Code.READFILE, b'{"container":"c1","file":"/tmp/link"}').ok
    client.command(Code.WRITEFILE, b'{"container":"c1","file":"/tmp/link"}mine')
    assert (root.parent / "host-file").read_text() == "host\n"
    # a second valid STARTPOD is refused and SIGTERMs the running containers
    again = client.command(Code.STARTPOD, Pod(hostname="again", share_dir="share_dir"))
    assert again == Reply(Code.STARTPOD, False, b"")
    assert client.wait_event("init").status == 0
