"""JSON bodies: exact Go bytes (CC), hyperhq key sets (HYPER), strict/lenient decoding."""

from __future__ import annotations

import re

import msgspec
import pytest

from protocol import LocalProtocolError, RemoteProtocolError
from protocol.hyperstart import (
    CC,
    HYPER,
    Capabilities,
    Constraints,
    Container,
    Dialect,
    EnvironmentVar,
    ExecCommand,
    FileCommand,
    FsmapDescriptor,
    IPAddress,
    KillCommand,
    MessageError,
    NetworkIface,
    Pod,
    Process,
    ProcessAsyncEvent,
    PsCommand,
    RemoveCommand,
    Rlimit,
    Route,
    RouteList,
    SignalCommand,
    SystemMountsInfo,
    VolumeDescriptor,
    WindowSize,
    WindowSizeMessage,
    decode_message,
    encode_message,
)

NULL_CAPS = b'{"bounding":null,"effective":null,"inheritable":null,"permitted":null,"ambient":null}'

# spec §7.16: the Go encoding of the CC-VC structs
SPEC_EXAMPLES: list[tuple[msgspec.Struct, bytes]] = [
    (
        Pod(
            hostname="pod1",
            interfaces=[
                NetworkIface(
                    new_device_name="eth0",
                    ip_addresses=[IPAddress(ip_address="172.17.0.2", net_mask="16")],
                    mtu=1500,
                    mac_addr="02:42:ac:11:00:02",
                )
            ],
            routes=[Route(dest="default", gateway="172.17.0.1", device="eth0")],
            share_dir="hyperShared",
        ),
        b'{"hostname":"pod1","interfaces":[{"newDeviceName":"eth0","ipAddresses":[{"ipAddress":'
        b'"172.17.0.2","netMask":"16"}],"mtu":1500,"macAddr":"02:42:ac:11:00:02"}],"routes":'
        b'[{"dest":"default","gateway":"172.17.0.1","device":"eth0"}],"shareDir":"hyperShared"}',
    ),
    (
        ExecCommand(
            container="c1", process=Process(stdio=5, stderr=6, args=["/bin/ls"], workdir="/")
        ),
        b'{"container":"c1","process":{"terminal":false,"stdio":5,"stderr":6,"args":["/bin/ls"],'
        b'"workdir":"/","noNewPrivileges":false,"capabilities":' + NULL_CAPS + b"}}",
    ),
    (WindowSize(seq=5, row=24, column=80), b'{"seq":5,"row":24,"column":80}'),
    (
        KillCommand(container="c1", signal=15),
        b'{"container":"c1","signal":15,"allProcesses":false}',
    ),
]


@pytest.mark.parametrize(("msg", "wire"), SPEC_EXAMPLES)
def test_spec_example_encodes_exactly_and_decodes_back(msg: msgspec.Struct, wire: bytes) -> None:
    assert encode_message(msg) == wire
    assert encode_message(msg, CC) == wire
    assert decode_message(type(msg), wire) == msg


# Zero values: omitempty fields vanish, the others are emitted (Go encoding).
DEFAULT_ENCODINGS: list[tuple[msgspec.Struct, bytes]] = [
    (EnvironmentVar(), b'{"env":"","value":""}'),
    (Rlimit(), b'{"type":"","hard":0,"soft":0}'),
    (Capabilities(), NULL_CAPS),
    (
        Process(),
        b'{"terminal":false,"args":null,"workdir":"","noNewPrivileges":false,"capabilities":'
        + NULL_CAPS
        + b"}",
    ),
    (IPAddress(), b'{"ipAddress":"","netMask":""}'),
    (NetworkIface(), b'{"ipAddresses":null,"mtu":0,"macAddr":""}'),
    (Route(), b'{"dest":""}'),
    (RouteList(), b'{"routes":null}'),
    (
        VolumeDescriptor(),
        b'{"device":"","mount":"","readOnly":false,"dockerVolume":false}',
    ),
    (
        FsmapDescriptor(),
        b'{"source":"","path":"","readOnly":false,"dockerVolume":false,"absolutePath":false,'
        b'"scsiAddr":""}',
    ),
    (SystemMountsInfo(), b'{"bindMountDev":false,"devShmSize":0}'),
    (Constraints(), b'{"CPUQuota":0,"CPUPeriod":0}'),
    (
        Container(),
        b'{"id":"","rootfs":"","image":"","process":null,"restartPolicy":"","initialize":false,'
        b'"systemMountsInfo":{"bindMountDev":false,"devShmSize":0},'
        b'"constraints":{"CPUQuota":0,"CPUPeriod":0}}',
    ),
    (Pod(), b'{"hostname":"","shareDir":""}'),
    (ExecCommand(), b'{"process":' + encode_message(Process()) + b"}"),
    (KillCommand(), b'{"container":"","signal":0,"allProcesses":false}'),
    (RemoveCommand(), b'{"container":""}'),
    (PsCommand(), b'{"container":"","format":"","psargs":null}'),
    (FileCommand(), b'{"container":"","file":""}'),
    (SignalCommand(), b'{"container":"","process":"","signal":0}'),
    (WindowSize(), b'{"seq":0,"row":0,"column":0}'),
    (WindowSizeMessage(), b'{"container":"","process":"","row":0,"column":0}'),
    (ProcessAsyncEvent(), b'{"container":"","process":"","event":""}'),
]


@pytest.mark.parametrize(("msg", "wire"), DEFAULT_ENCODINGS, ids=lambda v: type(v).__name__)
def test_zero_values_follow_go_omitempty(msg: msgspec.Struct, wire: bytes) -> None:
    assert encode_message(msg, CC) == wire
    assert decode_message(type(msg), wire, CC) == msg


def test_full_process_key_order_is_cc_vc_then_id() -> None:
    proc = Process(
        user="u",
        group="g",
        additional_groups=["a"],
        terminal=True,
        stdio=1,
        stderr=2,
        args=["x"],
        envs=[EnvironmentVar(env="A", value="1")],
        workdir="/w",
        rlimits=[Rlimit(type="RLIMIT_NOFILE", hard=2, soft=1)],
        no_new_privileges=True,
        capabilities=Capabilities(bounding=["CAP_KILL"], ambient=[]),
        id="p1",
    )
    assert encode_message(proc) == (
        b'{"user":"u","group":"g","additionalGroups":["a"],"terminal":true,"stdio":1,"stderr":2,'
        b'"args":["x"],"envs":[{"env":"A","value":"1"}],"workdir":"/w","rlimits":[{"type":'
        b'"RLIMIT_NOFILE","hard":2,"soft":1}],"noNewPrivileges":true,"capabilities":{"bounding":'
        b'["CAP_KILL"],"effective":null,"inheritable":null,"permitted":null,"ambient":[]},'
        b'"id":"p1"}'
    )


def test_full_container_key_order() -> None:
    container = Container(
        id="c1",
        rootfs="rootfs",
        fstype="ext4",
        image="vda",
        scsi_addr="0:0",
        volumes=[VolumeDescriptor(device="vdb", addr="1:0", mount="/m", fstype="xfs")],
        fsmap=[FsmapDescriptor(source="s", path="/p", read_only=True)],
        sysctl={"net.b": "1", "net.a": "2"},
        process=Process(stdio=3),
        restart_policy="never",
        initialize=True,
        system_mounts_info=SystemMountsInfo(bind_mount_dev=True, dev_shm_size=65536),
        constraints=Constraints(cpu_quota=-1, cpu_period=100000, cpu_shares=1024),
    )
    assert encode_message(container) == (
        b'{"id":"c1","rootfs":"rootfs","fstype":"ext4","image":"vda","scsiAddr":"0:0",'
        b'"volumes":[{"device":"vdb","addr":"1:0","mount":"/m","fstype":"xfs","readOnly":false,'
        b'"dockerVolume":false}],"fsmap":[{"source":"s","path":"/p","readOnly":true,'
        b'"dockerVolume":false,"absolutePath":false,"scsiAddr":""}],'
        b'"sysctl":{"net.a":"2","net.b":"1"},"process":{"terminal":false,"stdio":3,"args":null,'
        b'"workdir":"","noNewPrivileges":false,"capabilities":' + NULL_CAPS + b'},"restartPolicy":'
        b'"never","initialize":true,"systemMountsInfo":{"bindMountDev":true,"devShmSize":65536},'
        b'"constraints":{"CPUQuota":-1,"CPUPeriod":100000,"CPUShares":1024}}'
    )
    assert decode_message(Container, encode_message(container)) == container


def test_event_status_zero_is_omitted_in_cc_and_written_by_hyper() -> None:
    event = ProcessAsyncEvent(container="c1", process="init", event="finished", status=0)
    assert encode_message(event, CC) == b'{"container":"c1","process":"init","event":"finished"}'
    assert encode_message(event, HYPER) == (
        b'{"container":"c1","process":"init","event":"finished","status":0}'
    )
    with_info = msgspec.structs.replace(event, info="oom", status=137)
    assert encode_message(with_info, HYPER) == (
        b'{"container":"c1","process":"init","event":"finished","info":"oom","status":137}'
    )
    assert encode_message(with_info, CC) == encode_message(with_info, HYPER)


def test_strings_are_escaped_like_go() -> None:
    msg = RemoveCommand(container="<a&b>\u2028\u2029\u00e9\n")
    assert encode_message(msg) == (
        b'{"container":"\\u003ca\\u0026b\\u003e\\u2028\\u2029\xc3\xa9\\n"}'
    )
    assert decode_message(RemoveCommand, encode_message(msg)) == msg
    assert encode_message(msg, HYPER) == encode_message(msg, CC)


# --- HYPER encoding --------------------------------------------------------------------------

HYPER_ENCODINGS: list[tuple[msgspec.Struct, bytes]] = [
    (  # the hostside's EXECCMD of exec_and_signals, byte for byte
        ExecCommand(
            container="c1",
            process=Process(
                id="ex1",
                stdio=3,
                stderr=4,
                args=["/bin/echo", "ex"],
                envs=[EnvironmentVar(env="PATH", value="/bin")],
                workdir="/",
            ),
        ),
        b'{"container":"c1","process":{"id":"ex1","terminal":false,"stdio":3,"stderr":4,'
        b'"args":["/bin/echo","ex"],"envs":[{"env":"PATH","value":"/bin"}],"workdir":"/"}}',
    ),
    (  # CC-only process keys are dropped; id defaults to the stdio seq
        Process(
            terminal=True,
            stdio=7,
            args=["sh"],
            rlimits=[Rlimit(type="RLIMIT_NOFILE", hard=1, soft=1)],
            no_new_privileges=True,
            capabilities=Capabilities(bounding=["CAP_KILL"]),
            user="root",
            additional_groups=["wheel"],
        ),
        b'{"id":"7","user":"root","additionalGroups":["wheel"],"terminal":true,"stdio":7,'
        b'"args":["sh"],"workdir":""}',
    ),
    (
        Container(
            id="c1",
            rootfs="rootfs",
            image="c1",
            scsi_addr="0:1",
            fsmap=[FsmapDescriptor(source="s", path="/p", absolute_path=True, scsi_addr="0:2")],
            sysctl={"z": "1", "a": "2"},
            process=Process(stdio=1, stderr=2, args=["/bin/cat"], workdir="/", id="init"),
            system_mounts_info=SystemMountsInfo(bind_mount_dev=True),
            constraints=Constraints(cpu_quota=5),
        ),
        b'{"id":"c1","rootfs":"rootfs","image":"c1","fsmap":[{"source":"s","path":"/p",'
        b'"readOnly":false,"dockerVolume":false}],"sysctl":{"a":"2","z":"1"},"process":{"id":'
        b'"init","terminal":false,"stdio":1,"stderr":2,"args":["/bin/cat"],"workdir":"/"}}',
    ),
    (
        Container(id="c2", process=None, restart_policy="always", initialize=True),
        b'{"id":"c2","rootfs":"","image":"","restartPolicy":"always","initialize":true}',
    ),
    (
        Pod(
            hostname="h",
            interfaces=[
                NetworkIface(
                    device="eth0",
                    new_device_name="eth1",
                    ip_addresses=[IPAddress(ip_address="10.0.0.2", net_mask="24")],
                    mtu=1500,
                    mac_addr="02:00:00:00:00:01",
                ),
                NetworkIface(device="lo"),
            ],
            dns=["8.8.8.8"],
            routes=[Route(dest="default", gateway="10.0.0.1")],
            share_dir="share_dir",
        ),
        b'{"hostname":"h","interfaces":[{"device":"eth0","newDeviceName":"eth1","ipAddresses":'
        b'[{"ipAddress":"10.0.0.2","netMask":"24"}],"mtu":1500},{"device":"lo"}],"dns":'
        b'["8.8.8.8"],"routes":[{"dest":"default","gateway":"10.0.0.1"}],"shareDir":"share_dir"}',
    ),
    (
        KillCommand(container="c1", signal=15, all_processes=True),
        b'{"container":"c1","signal":15}',
    ),
    (
        WindowSizeMessage(container="c1", process="ex3", row=33, column=111),
        b'{"container":"c1","process":"ex3","row":33,"column":111}',
    ),
    (
        SignalCommand(container="c1", process="ex2", signal=15),
        b'{"container":"c1","process":"ex2","signal":15}',
    ),
    (RemoveCommand(container="c1"), b'{"container":"c1"}'),
    (FileCommand(container="c1", file="/etc/x"), b'{"container":"c1","file":"/etc/x"}'),
    (RouteList(), b"{}"),
    (
        RouteList(routes=[Route(dest="10.0.0.0/8", device="eth0")]),
        b'{"routes":[{"dest":"10.0.0.0/8","device":"eth0"}]}',
    ),
    (
        VolumeDescriptor(device="vdb", mount="/m", read_only=True),
        b'{"device":"vdb","mount":"/m","readOnly":true,"dockerVolume":false}',
    ),
]


@pytest.mark.parametrize(("msg", "wire"), HYPER_ENCODINGS, ids=lambda v: type(v).__name__)
def test_hyper_encoding_emits_only_keys_hyperstart_knows(msg: msgspec.Struct, wire: bytes) -> None:
    assert encode_message(msg, HYPER) == wire
    decode_message(type(msg), wire, HYPER)  # strict decoding accepts what we send


def test_hyper_process_id_is_kept_when_given() -> None:
    wire = encode_message(Process(id="init", stdio=9), HYPER)
    assert wire.startswith(b'{"id":"init",')
    assert b'"id":"9"' in encode_message(Process(stdio=9), HYPER)
    assert b'"id":"0"' in encode_message(ExecCommand(process=Process()), HYPER)


@pytest.mark.parametrize(
    ("msg", "fault"),
    [
        (WindowSize(seq=1, row=2, column=3), "WindowSizeMessage"),
        (PsCommand(container="c1"), "PSCONTAINER"),
        (Rlimit(), "rlimits"),
        (Capabilities(), "capabilities"),
        (SystemMountsInfo(), "systemMountsInfo"),
        (Constraints(), "constraints"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, msgspec.Struct) else "",
)
def test_bodies_without_hyper_form_are_refused(msg: msgspec.Struct, fault: str) -> None:
    with pytest.raises(LocalProtocolError, match=fault):
        encode_message(msg, HYPER)
    assert encode_message(msg, CC)  # CC has a form for each of them


def test_foreign_struct_is_refused_in_hyper_and_encoded_in_cc() -> None:
    class Foreign(msgspec.Struct):
        x: int

    with pytest.raises(LocalProtocolError, match="not a hyperstart message"):
        encode_message(Foreign(1), HYPER)
    assert encode_message(Foreign(1), CC) == b'{"x":1}'
    assert decode_message(Foreign, b'{"x":2}', HYPER) == Foreign(2)


def test_unencodable_value_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        encode_message(RemoveCommand(container="\ud800"))


# --- decoding --------------------------------------------------------------------------------

STRICT_REJECTS: list[tuple[type[msgspec.Struct], bytes, str]] = [
    (Container, b'{"id":"c1","systemMountsInfo":{}}', "unknown field `systemMountsInfo`"),
    (Container, b'{"id":"c1","constraints":{}}', "unknown field `constraints`"),
    (Container, b'{"id":"c1","scsiAddr":"0:0"}', "unknown field `scsiAddr`"),
    (
        Container,
        b'{"id":"c1","process":{"envs":[{"env":"A","value":"1","x":1}]}}',
        "unknown field `x` - at `$.process.envs[0]`",
    ),
    (ExecCommand, b'{"process":{"capabilities":{}}}', "unknown field `capabilities`"),
    (ExecCommand, b'{"process":{"noNewPrivileges":false}}', "unknown field `noNewPrivileges`"),
    (ExecCommand, b'{"process":{"rlimits":[]}}', "unknown field `rlimits`"),
    (Pod, b'{"interfaces":[{"macAddr":"x"}]}', "unknown field `macAddr`"),
    (Pod, b'{"routes":[{"dest":"d","src":"s"}]}', "unknown field `src`"),
    (Pod, b'{"hostname":"h","bogus":1}', "unknown field `bogus`"),
    (
        Container,
        b'{"fsmap":[{"source":"s","path":"p","absolutePath":true}]}',
        "unknown field `absolutePath`",
    ),
    (WindowSizeMessage, b'{"seq":1,"row":24,"column":80}', "unknown field `seq`"),
    (ProcessAsyncEvent, b'{"container":"c","process":"p","event":"e","x":0}', "unknown field"),
    (RemoveCommand, b'{"container":"c","force":true}', "unknown field `force`"),
    (RouteList, b'{"routes":[],"x":1}', "unknown field `x`"),
]


@pytest.mark.parametrize(("cls", "payload", "fault"), STRICT_REJECTS)
def test_hyper_decoding_is_strict_and_cc_lenient(
    cls: type[msgspec.Struct], payload: bytes, fault: str
) -> None:
    with pytest.raises(MessageError, match=re.escape(fault)):
        decode_message(cls, payload, HYPER)
    assert isinstance(decode_message(cls, payload, CC), cls)  # Go ignores unknown keys


HYPER_ACCEPTS: list[tuple[type[msgspec.Struct], bytes]] = [
    (
        Container,
        b'{"id":"c","addr":"0:1","readOnly":true,"ports":[{"hostPort":80,'
        b'"containerPort":8080,"protocol":"tcp"}]}',
    ),
    (
        Pod,
        b'{"hostname":"h","dnsSearch":["a"],"dnsOptions":["b"],"restartPolicy":"",'
        b'"portmappingWhiteLists":{"internalNetworks":[],"externalNetworks":null}}',
    ),
    (NetworkIface, b'{"device":"eth0","ipAddress":"10.0.0.2","netMask":"24"}'),
    (KillCommand, b'{"container":"c1","signal":9,"allProcesses":true,"whatever":1}'),
    (
        ProcessAsyncEvent,
        b'{"container":"c","process":"p","event":"finished","info":"i","status":1}',
    ),
]


@pytest.mark.parametrize(("cls", "payload"), HYPER_ACCEPTS)
def test_hyper_decoding_accepts_keys_hyperstart_knows(
    cls: type[msgspec.Struct], payload: bytes
) -> None:
    assert decode_message(cls, payload, HYPER) == decode_message(cls, payload, CC)


BAD_PAYLOADS: list[tuple[type[msgspec.Struct], bytes, str]] = [
    (Pod, b"", "malformed Pod body"),
    (Pod, b"{", "malformed Pod body"),
    (Pod, b"[]", "invalid Pod body: Expected `object`, got `array`"),
    (Pod, b'{"hostname":1}', "invalid Pod body: Expected `str`, got `int` - at `$.hostname`"),
    (WindowSize, b'{"seq":-1}', "invalid WindowSize body: Expected `int` >= 0 - at `$.seq`"),
    (WindowSize, b'{"row":65536}', "<= 65535 - at `$.row`"),
    (Process, b'{"terminal":"yes"}', "Expected `bool`, got `str` - at `$.terminal`"),
    (Process, b'{"envs":null}', "at `$.envs`"),
    (ProcessAsyncEvent, b'{"status":1.5}', "at `$.status`"),
    (KillCommand, b'{"signal":99999999999999999999}', "at `$.signal`"),
    (ExecCommand, b'{"process":null}', "at `$.process`"),
    (RemoveCommand, b'{"container":"c"} x', "malformed RemoveCommand body"),
]


@pytest.mark.parametrize("dialect", [CC, HYPER], ids=["cc", "hyper"])
@pytest.mark.parametrize(("cls", "payload", "fault"), BAD_PAYLOADS)
def test_decode_failures_name_the_fault(
    dialect: Dialect, cls: type[msgspec.Struct], payload: bytes, fault: str
) -> None:
    with pytest.raises(MessageError, match=re.escape(fault)) as info:
        decode_message(cls, payload, dialect)
    assert isinstance(info.value, RemoteProtocolError)


def test_null_where_go_allows_nil() -> None:
    proc = decode_message(Process, b'{"args":null}')
    assert proc.args is None
    assert decode_message(Container, b'{"process":null}').process is None
    assert decode_message(NetworkIface, b'{"ipAddresses":null}').ip_addresses is None
    assert decode_message(PsCommand, b'{"psargs":null}').psargs is None


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        ("a\bb\fc", b'"a\\u0008b\\u000cc"'),
        ("\\b\\f", b'"\\\\b\\\\f"'),  # escaped backslashes before b/f stay as they are
        ("\\\b", b'"\\\\\\u0008"'),
        ("\x00\x1f\x7f", b'"\\u0000\\u001f\x7f"'),
    ],
)
def test_control_characters_are_escaped_like_old_go(value: str, wire: bytes) -> None:
    msg = RemoveCommand(container=value)
    assert encode_message(msg) == b'{"container":' + wire + b"}"
    assert decode_message(RemoveCommand, encode_message(msg)) == msg


def test_importing_the_package_pulls_in_no_io_or_async_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, protocol.hyperstart\n"
        "bad = {'anyio', 'asyncio', 'socket', 'uvloop', 'trio', 'hyperd', 'selectors'}\n"
        "print(sorted(bad & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("cls", "payload", "fault"),
    [
        (WindowSize, b'{"seq":18446744073709551616}', "seq 18446744073709551616 does not fit"),
        (Process, b'{"stdio":18446744073709551616}', "stdio 18446744073709551616 does not fit"),
        (Process, b'{"stderr":99999999999999999999999}', "stderr 99999999999999999999999"),
        (Rlimit, b'{"soft":18446744073709551616}', "soft 18446744073709551616"),
        (Constraints, b'{"CPUShares":18446744073709551616}', "cpu_shares 18446744073709551616"),
        (ExecCommand, b'{"process":{"stdio":18446744073709551616}}', "at `$.process`"),
    ],
)
def test_u64_upper_bound_is_checked(cls: type[msgspec.Struct], payload: bytes, fault: str) -> None:
    for dialect in (CC, HYPER):
        with pytest.raises(MessageError, match=re.escape(fault)):
            decode_message(cls, payload, dialect)
    assert decode_message(WindowSize, b'{"seq":18446744073709551615}').seq == (1 << 64) - 1


def test_u64_bound_is_checked_on_construction_too() -> None:
    with pytest.raises(ValueError, match="stdio -1 does not fit in a u64"):
        Process(stdio=-1)
