"""Hypothesis: message round trips in both dialects; any bytes decode or raise
RemoteProtocolError, with bounded buffering, for every hyperstart decoder and endpoint."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import NEED_DATA, RemoteProtocolError
from protocol.hyperstart import (
    CC,
    HYPER,
    AgentCtlConnection,
    AsyncEvent,
    Capabilities,
    Code,
    Constraints,
    Container,
    Dialect,
    EnvironmentVar,
    ExecCommand,
    FileCommand,
    FsmapDescriptor,
    HostCtlConnection,
    HostTtyConnection,
    IPAddress,
    KillCommand,
    NetworkIface,
    NextAck,
    Pod,
    Process,
    ProcessAsyncEvent,
    PsCommand,
    Ready,
    RemoveCommand,
    Reply,
    Rlimit,
    Route,
    RouteList,
    SignalCommand,
    SystemMountsInfo,
    TtyData,
    TtyEof,
    TtyExitStatus,
    UnexpectedReply,
    VolumeDescriptor,
    WindowSize,
    WindowSizeMessage,
    decode_message,
    encode_ctl,
    encode_message,
    encode_tty,
)

# strings with the characters Go escapes, non-ASCII and control characters; no lone surrogates
text = st.text(
    alphabet=st.one_of(
        st.sampled_from('<>&"\\\n\t\u2028\u2029\u00e9\x00'),
        st.characters(codec="utf-8"),
    ),
    max_size=6,
)
names = st.lists(text, max_size=3)
u16 = st.integers(0, 0xFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
i64 = st.integers(-(1 << 63), (1 << 63) - 1)
LIST = 2  # list sizes for nested bodies: keeps examples small


def _cc_only(hyper: bool, strategy: st.SearchStrategy[Any], zero: Any) -> st.SearchStrategy[Any]:
    """Fields hyperhq has no key for: fixed at their zero value when testing HYPER."""
    return st.just(zero) if hyper else strategy


def env() -> st.SearchStrategy[EnvironmentVar]:
    return st.builds(EnvironmentVar, env=text, value=text)


def rlimit() -> st.SearchStrategy[Rlimit]:
    return st.builds(Rlimit, type=text, hard=u64, soft=u64)


def caps() -> st.SearchStrategy[Capabilities]:
    opt = st.none() | names
    return st.builds(
        Capabilities, bounding=opt, effective=opt, inheritable=opt, permitted=opt, ambient=opt
    )


def process(hyper: bool) -> st.SearchStrategy[Process]:
    return st.builds(
        Process,
        user=text,
        group=text,
        additional_groups=names,
        terminal=st.booleans(),
        stdio=u64,
        stderr=u64,
        args=st.none() | names,
        envs=st.lists(env(), max_size=LIST),
        workdir=text,
        rlimits=_cc_only(hyper, st.lists(rlimit(), max_size=LIST), []),
        no_new_privileges=_cc_only(hyper, st.booleans(), False),
        capabilities=_cc_only(hyper, caps(), Capabilities()),
        # hyperhq always gets an id (str(stdio) when empty): generate one so it round-trips
        id=text.filter(bool) if hyper else text,
    )


def ip() -> st.SearchStrategy[IPAddress]:
    return st.builds(IPAddress, ip_address=text, net_mask=text)


def iface(hyper: bool) -> st.SearchStrategy[NetworkIface]:
    return st.builds(
        NetworkIface,
        device=text,
        new_device_name=text,
        ip_addresses=st.none() | st.lists(ip(), max_size=LIST),
        mtu=i64,
        mac_addr=_cc_only(hyper, text, ""),
    )


def route() -> st.SearchStrategy[Route]:
    return st.builds(Route, dest=text, gateway=text, device=text)


def volume() -> st.SearchStrategy[VolumeDescriptor]:
    return st.builds(
        VolumeDescriptor,
        device=text,
        addr=text,
        mount=text,
        fstype=text,
        read_only=st.booleans(),
        docker_volume=st.booleans(),
    )


def fsmap(hyper: bool) -> st.SearchStrategy[FsmapDescriptor]:
    return st.builds(
        FsmapDescriptor,
        source=text,
        path=text,
        read_only=st.booleans(),
        docker_volume=st.booleans(),
        absolute_path=_cc_only(hyper, st.booleans(), False),
        scsi_addr=_cc_only(hyper, text, ""),
    )


def mounts() -> st.SearchStrategy[SystemMountsInfo]:
    return st.builds(SystemMountsInfo, bind_mount_dev=st.booleans(), dev_shm_size=i64)


def constraints() -> st.SearchStrategy[Constraints]:
    return st.builds(Constraints, cpu_quota=i64, cpu_period=u64, cpu_shares=u64)


def container(hyper: bool) -> st.SearchStrategy[Container]:
    return st.builds(
        Container,
        id=text,
        rootfs=text,
        fstype=text,
        image=text,
        scsi_addr=_cc_only(hyper, text, ""),
        volumes=st.lists(volume(), max_size=LIST),
        fsmap=st.lists(fsmap(hyper), max_size=LIST),
        sysctl=st.dictionaries(text, text, max_size=3),
        process=st.none() | process(hyper),
        restart_policy=text,
        initialize=st.booleans(),
        system_mounts_info=_cc_only(hyper, mounts(), SystemMountsInfo()),
        constraints=_cc_only(hyper, constraints(), Constraints()),
    )


def pod(hyper: bool) -> st.SearchStrategy[Pod]:
    return st.builds(
        Pod,
        hostname=text,
        containers=st.lists(container(hyper), max_size=LIST),
        interfaces=st.lists(iface(hyper), max_size=LIST),
        dns=names,
        routes=st.lists(route(), max_size=LIST),
        share_dir=text,
    )


def strategies(hyper: bool) -> dict[type[msgspec.Struct], st.SearchStrategy[Any]]:
    table: dict[type[msgspec.Struct], st.SearchStrategy[Any]] = {
        EnvironmentVar: env(),
        IPAddress: ip(),
        Route: route(),
        RouteList: st.builds(RouteList, routes=st.none() | st.lists(route(), max_size=LIST)),
        VolumeDescriptor: volume(),
        FsmapDescriptor: fsmap(hyper),
        Process: process(hyper),
        NetworkIface: iface(hyper),
        Container: container(hyper),
        Pod: pod(hyper),
        ExecCommand: st.builds(ExecCommand, container=text, process=process(hyper)),
        KillCommand: st.builds(
            KillCommand,
            container=text,
            signal=i64,
            all_processes=_cc_only(hyper, st.booleans(), False),
        ),
        RemoveCommand: st.builds(RemoveCommand, container=text),
        FileCommand: st.builds(FileCommand, container=text, file=text),
        SignalCommand: st.builds(SignalCommand, container=text, process=text, signal=i64),
        WindowSizeMessage: st.builds(
            WindowSizeMessage, container=text, process=text, row=u16, column=u16
        ),
        ProcessAsyncEvent: st.builds(
            ProcessAsyncEvent, container=text, process=text, event=text, info=text, status=i64
        ),
    }
    if not hyper:  # bodies with no hyperhq form
        table.update(
            {
                Rlimit: rlimit(),
                Capabilities: caps(),
                SystemMountsInfo: mounts(),
                Constraints: constraints(),
                PsCommand: st.builds(
                    PsCommand, container=text, format=text, psargs=st.none() | names
                ),
                WindowSize: st.builds(WindowSize, seq=u64, row=u16, column=u16),
            }
        )
    return table


CC_STRATEGIES = strategies(hyper=False)
HYPER_STRATEGIES = strategies(hyper=True)
ROUND_TRIPS = [(CC, cls, s) for cls, s in CC_STRATEGIES.items()] + [
    (HYPER, cls, s) for cls, s in HYPER_STRATEGIES.items()
]


def test_every_message_type_is_round_tripped() -> None:
    assert len(CC_STRATEGIES) == 23
    assert set(HYPER_STRATEGIES) < set(CC_STRATEGIES)


@pytest.mark.parametrize(
    ("dialect", "cls", "strategy"),
    ROUND_TRIPS,
    ids=[f"{d.name}-{c.__name__}" for d, c, _ in ROUND_TRIPS],
)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_decode_encode_round_trip(
    dialect: Dialect, cls: type[msgspec.Struct], strategy: st.SearchStrategy[Any], data: Any
) -> None:
    msg = data.draw(strategy)
    wire = encode_message(msg, dialect)
    assert decode_message(cls, wire, dialect) == msg
    # the CC decoder (lenient) reads every hyperhq body too
    assert decode_message(cls, wire, CC) == msg


@settings(max_examples=60, deadline=None)
@given(proc=process(hyper=False))
def test_hyper_process_projection(proc: Process) -> None:
    """A CC process sent to hyperhq keeps every hyperhq key and gets a default id."""
    got = decode_message(Process, encode_message(proc, HYPER), HYPER)
    assert got == msgspec.structs.replace(
        proc,
        rlimits=[],
        no_new_privileges=False,
        capabilities=Capabilities(),
        id=proc.id or str(proc.stdio),
    )


# --- any bytes -------------------------------------------------------------------------------

MAX_FRAME = 200


def _ctl_junk() -> st.SearchStrategy[list[bytes]]:
    """Valid frames (some with JSON bodies) mixed with arbitrary bytes."""
    frames = st.builds(
        encode_ctl,
        st.sampled_from([0, 8, 9, 10, 14, 23, 24, 99]),
        st.one_of(
            st.binary(max_size=40),
            st.just(b'{"container":"c","process":"p","event":"finished","status":1}'),
            st.integers(0, 0xFFFFFFFF).map(lambda n: n.to_bytes(4, "big")),
        ),
    )
    return st.lists(st.one_of(frames, st.binary(max_size=24)), max_size=10)


def _tty_junk() -> st.SearchStrategy[list[bytes]]:
    frames = st.builds(encode_tty, st.integers(0, 5), st.binary(max_size=3))
    return st.lists(st.one_of(frames, st.binary(max_size=24)), max_size=10)


def _pump(conn: Any, chunks: list[bytes], check: Callable[[object], None]) -> None:
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        try:
            while (event := conn.next_event()) is not NEED_DATA:
                check(event)
        except RemoteProtocolError:
            return
        assert conn._decoder.buffered < MAX_FRAME


@pytest.mark.parametrize("dialect", [CC, HYPER], ids=["cc", "hyper"])
@given(chunks=_ctl_junk(), commands=st.integers(0, 5))
def test_host_ctl_any_bytes(dialect: Dialect, chunks: list[bytes], commands: int) -> None:
    conn = HostCtlConnection(dialect, max_frame=MAX_FRAME)
    for _ in range(commands):
        conn.send_command(Code.PING)

    def check(event: object) -> None:
        assert isinstance(event, Ready | Reply | NextAck | AsyncEvent | UnexpectedReply)
        assert 0 <= conn.pending <= commands

    _pump(conn, chunks, check)


@pytest.mark.parametrize("dialect", [CC, HYPER], ids=["cc", "hyper"])
@given(chunks=_ctl_junk())
def test_agent_ctl_any_bytes(dialect: Dialect, chunks: list[bytes]) -> None:
    conn = AgentCtlConnection(dialect, max_frame=MAX_FRAME)
    _pump(conn, chunks, lambda event: None)


@given(chunks=_tty_junk(), status_frames=st.booleans())
def test_host_tty_any_bytes(chunks: list[bytes], status_frames: bool) -> None:
    conn = HostTtyConnection(max_frame=MAX_FRAME, exit_status_frames=status_frames)

    def check(event: object) -> None:
        assert isinstance(event, TtyData | TtyEof | TtyExitStatus)
        if isinstance(event, TtyExitStatus):
            assert 0 <= event.status <= 255

    _pump(conn, chunks, check)


JSON_FRAGMENTS = st.sampled_from(
    [
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b'"container"',
        b'"process"',
        b'"args"',
        b"null",
        b"1",
        b"-1",
        b'"x"',
        b"true",
        b'"envs"',
        b'"seq"',
        b"1e3",
        b"\xff",
    ]
)


@pytest.mark.parametrize("dialect", [CC, HYPER], ids=["cc", "hyper"])
@pytest.mark.parametrize("cls", list(CC_STRATEGIES), ids=lambda c: c.__name__)
@settings(max_examples=40, deadline=None)
@given(payload=st.one_of(st.binary(max_size=40), st.lists(JSON_FRAGMENTS).map(b"".join)))
def test_decode_message_any_bytes(
    dialect: Dialect, cls: type[msgspec.Struct], payload: bytes
) -> None:
    try:
        msg = decode_message(cls, payload, dialect)
    except RemoteProtocolError as exc:
        assert cls.__name__ in str(exc)
    else:
        assert isinstance(msg, cls)
