"""Pure builders of hyperstart messages (the seed's logic): table-driven, exact bytes."""

from __future__ import annotations

import logging
import socket
from typing import Any

import msgspec
import pytest

from hyperd import agent
from hyperd.agent import (
    build_container,
    build_exec,
    build_interfaces_and_routes,
    build_kill,
    build_pod,
    build_process,
    build_ps,
    build_remove,
    build_route,
    build_signal,
    build_winsize,
    drive_name,
    fsmap_from_mounts,
    scsi_address,
)
from hyperd.errors import InvalidParams
from hyperd.host.model import HostAddress, HostLink, HostNetwork, HostRoute, SharedMount
from hyperd.spec import (
    BlockDevice,
    BlockRootfs,
    CapabilitiesSpec,
    DeviceSpec,
    DirRootfs,
    ProcessSpec,
    ResourcesSpec,
)
from protocol.hyperstart import (
    CC,
    HYPER,
    Capabilities,
    Constraints,
    EnvironmentVar,
    FsmapDescriptor,
    IPAddress,
    NetworkIface,
    Process,
    Route,
    WindowSize,
    WindowSizeMessage,
    encode_message,
)

V4 = socket.AF_INET
V6 = socket.AF_INET6


def with_seqs(process: Process, stdio: int, stderr: int = 0) -> Process:
    """What the proxy does before the agent sees the process: fill in the sequence numbers."""
    return msgspec.structs.replace(process, stdio=stdio, stderr=stderr)


# --------------------------------------------------------------------------------------------
# drive names and SCSI addresses


@pytest.mark.parametrize(
    ("index", "name"),
    [
        (0, "vda"),
        (1, "vdb"),
        (25, "vdz"),
        (26, "vdaa"),
        (27, "vdab"),
        (51, "vdaz"),
        (52, "vdba"),
        (701, "vdzz"),
        (702, "vdaaa"),
        (18277, "vdzzz"),
        (18278, "vdaaaa"),
    ],
)
def test_drive_name(index: int, name: str) -> None:
    assert drive_name(index) == name


def test_drive_name_limits() -> None:
    # the largest index that fits in 30 letters is sum(26**k, k=1..30) - 1
    largest = sum(26**k for k in range(1, 31)) - 1
    assert drive_name(largest) == "vd" + "z" * 30
    assert len(drive_name(largest)) == 32
    with pytest.raises(InvalidParams, match="not supported"):
        drive_name(largest + 1)
    with pytest.raises(InvalidParams, match="negative"):
        drive_name(-1)


@pytest.mark.parametrize(
    ("index", "address"),
    [(0, "0:0"), (1, "0:1"), (255, "0:255"), (256, "1:0"), (257, "1:1"), (65535, "255:255")],
)
def test_scsi_address(index: int, address: str) -> None:
    assert scsi_address(index) == address


@pytest.mark.parametrize("index", [-1, 65536, 1 << 40])
def test_scsi_address_limits(index: int) -> None:
    with pytest.raises(InvalidParams) as info:
        scsi_address(index)
    assert info.value.data == {"field": "block.index"}


# --------------------------------------------------------------------------------------------
# processes


def test_build_process_seed_fields() -> None:
    spec = ProcessSpec(
        args=["/bin/sh", "-c", "env"],
        env=["PATH=/bin", "A=b=c", "EMPTY="],
        cwd="/work",
        user="1000",
        group="100",
        additional_groups=["10", "20"],
        terminal=True,
        no_new_privileges=True,
        capabilities=CapabilitiesSpec(bounding=["CAP_KILL"], effective=[], ambient=None),
    )
    p = build_process(spec)
    assert p.args == ["/bin/sh", "-c", "env"]
    assert p.envs == [
        EnvironmentVar(env="PATH", value="/bin"),
        EnvironmentVar(env="A", value="b=c"),
        EnvironmentVar(env="EMPTY", value=""),
    ]
    assert (p.workdir, p.user, p.group, p.additional_groups) == (
        "/work",
        "1000",
        "100",
        ["10", "20"],
    )
    assert (p.terminal, p.no_new_privileges) == (True, True)
    assert p.capabilities == Capabilities(bounding=["CAP_KILL"], effective=[])
    assert (p.stdio, p.stderr, p.id) == (0, 0, "")


def test_build_process_ids_per_dialect() -> None:
    spec = ProcessSpec(args=["true"])
    assert build_process(spec).id == ""
    assert build_process(spec, CC, process_id="e1").id == "e1"
    assert build_process(spec, HYPER).id == "init"
    assert build_process(spec, HYPER, process_id="e1").id == "e1"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (ProcessSpec(args=["x"], no_new_privileges=True), "process.no_new_privileges"),
        (ProcessSpec(args=["x"], capabilities=CapabilitiesSpec()), "process.capabilities"),
    ],
)
def test_hyper_refuses_what_it_cannot_enforce(spec: ProcessSpec, field: str) -> None:
    with pytest.raises(InvalidParams, match="hyperhq") as info:
        build_process(spec, HYPER)
    assert info.value.data == {"field": field}
    build_process(spec, CC)  # fine for CC


def test_exec_bytes_cc_match_the_spec_example() -> None:
    p = with_seqs(build_process(ProcessSpec(args=["/bin/ls"])), 5, 6)
    assert encode_message(build_exec("c1", p), CC) == (
        b'{"container":"c1","process":{"terminal":false,"stdio":5,"stderr":6,'
        b'"args":["/bin/ls"],"workdir":"/","noNewPrivileges":false,"capabilities":'
        b'{"bounding":null,"effective":null,"inheritable":null,"permitted":null,"ambient":null}}}'
    )


def test_exec_bytes_hyper_match_the_real_agent_transcript() -> None:
    spec = ProcessSpec(args=["/bin/echo", "ex"], env=["PATH=/bin"])
    p = with_seqs(build_process(spec, HYPER, process_id="ex1"), 3, 4)
    assert encode_message(build_exec("c1", p), HYPER) == (
        b'{"container":"c1","process":{"id":"ex1","terminal":false,"stdio":3,"stderr":4,'
        b'"args":["/bin/echo","ex"],"envs":[{"env":"PATH","value":"/bin"}],"workdir":"/"}}'
    )


# --------------------------------------------------------------------------------------------
# network

ETH0 = HostLink(
    name="eth0",
    mtu=1500,
    mac="02:42:ac:11:00:02",
    addresses=(
        HostAddress(V4, "172.17.0.2", 16),
        HostAddress(V6, "fd00::2", 64),
        HostAddress(V6, "fe80::42:acff:fe11:2", 64),
    ),
    routes=(
        HostRoute(V4, "0.0.0.0/0", "172.17.0.1", "eth0"),
        HostRoute(V4, "172.17.0.0/16", None, "eth0"),
        HostRoute(V6, "fd00::/64", None, "eth0"),
        HostRoute(V6, "::/0", "fd00::1", "eth0"),
    ),
)
LO = HostLink(
    name="lo",
    mtu=65536,
    mac="00:00:00:00:00:00",
    loopback=True,
    addresses=(HostAddress(V4, "127.0.0.1", 8), HostAddress(V6, "::1", 128)),
)


def test_interfaces_and_routes_ipv4_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hyperd.agent")
    ifaces, routes = build_interfaces_and_routes(HostNetwork(links=(LO, ETH0)))
    assert ifaces == [
        NetworkIface(
            new_device_name="eth0",
            ip_addresses=[IPAddress(ip_address="172.17.0.2", net_mask="16")],
            mtu=1500,
            mac_addr="02:42:ac:11:00:02",
        )
    ]
    assert routes == [
        Route(dest="default", gateway="172.17.0.1", device="eth0"),
        Route(dest="172.17.0.0/16", gateway="", device="eth0"),
    ]
    warnings = " ".join(r.getMessage() for r in caplog.records)
    for skipped in ("lo", "fd00::2", "fe80::42:acff:fe11:2", "fd00::/64", "fd00::1"):
        assert skipped in warnings


def test_loopback_address_on_a_normal_link_is_skipped() -> None:
    link = HostLink(
        "dummy0", 1500, "aa:bb:cc:dd:ee:ff", addresses=(HostAddress(V4, "127.0.0.5", 8),)
    )
    ifaces, routes = build_interfaces_and_routes([link])
    assert ifaces == [
        NetworkIface(
            new_device_name="dummy0", ip_addresses=None, mtu=1500, mac_addr="aa:bb:cc:dd:ee:ff"
        )
    ]
    assert routes == []
    # a link without addresses encodes ipAddresses as null, like the seed's nil slice
    assert b'"ipAddresses":null' in encode_message(ifaces[0])


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        (HostRoute(V4, "0.0.0.0/0", "10.0.0.1", "eth0"), Route("default", "10.0.0.1", "eth0")),
        (HostRoute(V4, "10.0.0.0/8", None, "eth0"), Route("10.0.0.0/8", "", "eth0")),
        (HostRoute(V4, None, "10.0.0.1", "eth0"), Route("", "10.0.0.1", "eth0")),
        (
            HostRoute(V4, "192.168.1.7/32", "10.0.0.1", "eth0"),
            Route("192.168.1.7/32", "10.0.0.1", "eth0"),
        ),
        (HostRoute(V6, "::/0", "fe80::1", "eth0"), None),
        (HostRoute(V6, "fd00::/64", None, "eth0"), None),
        (HostRoute(V4, "10.0.0.0/8", "fe80::1", "eth0"), None),
    ],
)
def test_build_route(route: HostRoute, expected: Route | None) -> None:
    assert build_route(route, "eth0") == expected


def test_pod_bytes_cc_match_the_reference_transcript() -> None:
    link = HostLink(
        "eth0",
        1500,
        "02:42:ac:11:00:02",
        addresses=(HostAddress(V4, "172.17.0.2", 16),),
        routes=(
            HostRoute(V4, "0.0.0.0/0", "172.17.0.1", "eth0"),
            HostRoute(V4, "172.17.0.0/16", None, "eth0"),
        ),
    )
    ifaces, routes = build_interfaces_and_routes([link])
    pod = build_pod("pod3", ifaces, routes, dns=["8.8.8.8"])
    assert encode_message(pod, CC) == (
        b'{"hostname":"pod3","interfaces":[{"newDeviceName":"eth0","ipAddresses":'
        b'[{"ipAddress":"172.17.0.2","netMask":"16"}],"mtu":1500,"macAddr":"02:42:ac:11:00:02"}],'
        b'"dns":["8.8.8.8"],"routes":[{"dest":"default","gateway":"172.17.0.1","device":"eth0"},'
        b'{"dest":"172.17.0.0/16","device":"eth0"}],"shareDir":"hyperShared"}'
    )


def test_pod_bytes_hyper_name_the_device_and_drop_mac() -> None:
    ifaces, routes = build_interfaces_and_routes([ETH0], HYPER)
    assert ifaces[0].device == "eth0"
    assert encode_message(build_pod("p", ifaces, routes), HYPER) == (
        b'{"hostname":"p","interfaces":[{"device":"eth0","newDeviceName":"eth0","ipAddresses":'
        b'[{"ipAddress":"172.17.0.2","netMask":"16"}],"mtu":1500}],"routes":[{"dest":"default",'
        b'"gateway":"172.17.0.1","device":"eth0"},{"dest":"172.17.0.0/16","device":"eth0"}],'
        b'"shareDir":"hyperShared"}'
    )


def test_pod_without_network() -> None:
    pod = build_pod("pod1")
    assert encode_message(pod) == b'{"hostname":"pod1","shareDir":"hyperShared"}'
    assert build_pod("pod1", share_tag="share_dir").share_dir == "share_dir"


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("a" * 63, "a" * 63),
        ("a" * 64, "a" * 64),
        ("a" * 65, "a" * 64),
        ("h" * 200, "h" * 64),
        ("a" * 63 + "é", "a" * 63),  # never cut inside a UTF-8 character
        ("", ""),
    ],
)
def test_hostname_cut(hostname: str, expected: str) -> None:
    assert build_pod(hostname).hostname == expected


# --------------------------------------------------------------------------------------------
# containers

PROC = ProcessSpec(args=["/bin/sh"])


def test_container_shared_dir_rootfs() -> None:
    c = build_container("c1", DirRootfs(path="/r"), build_process(PROC))
    assert (c.id, c.image, c.rootfs, c.fstype, c.scsi_addr) == ("c1", "c1", "rootfs", "", "")
    assert agent.ROOTFS_DIR == "rootfs"


@pytest.mark.parametrize(
    ("block", "image", "scsi"),
    [
        (BlockDevice(index=0, fstype="ext4"), "vda", ""),
        (BlockDevice(index=27, fstype="xfs", driver="virtio-blk"), "vdab", ""),
        (BlockDevice(index=0, fstype="ext4", driver="virtio-scsi"), "c1", "0:0"),
        (BlockDevice(index=300, fstype="ext4", driver="virtio-scsi"), "c1", "1:44"),
    ],
)
def test_container_block_rootfs(block: BlockDevice, image: str, scsi: str) -> None:
    c = build_container("c1", BlockRootfs(block=block), build_process(PROC))
    assert (c.fstype, c.image, c.scsi_addr, c.rootfs) == (block.fstype, image, scsi, "rootfs")


def test_container_block_index_out_of_range() -> None:
    scsi = BlockRootfs(block=BlockDevice(index=70000, fstype="ext4", driver="virtio-scsi"))
    with pytest.raises(InvalidParams):
        build_container("c1", scsi, build_process(PROC))


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        (None, Constraints()),
        (ResourcesSpec(), Constraints()),
        (
            ResourcesSpec(cpu_quota=50000, cpu_period=100000),
            Constraints(cpu_quota=50000, cpu_period=100000),
        ),
        (ResourcesSpec(cpu_quota=50000), Constraints()),
        (ResourcesSpec(cpu_period=100000), Constraints()),
        (ResourcesSpec(cpu_shares=512), Constraints(cpu_shares=512)),
        (
            ResourcesSpec(cpu_quota=-1, cpu_period=100000, cpu_shares=2),
            Constraints(cpu_quota=-1, cpu_period=100000, cpu_shares=2),
        ),
    ],
)
def test_constraints(resources: ResourcesSpec | None, expected: Constraints) -> None:
    c = build_container("c1", DirRootfs(path="/r"), build_process(PROC), resources=resources)
    assert c.constraints == expected


def test_constraints_bytes() -> None:
    def constraints_json(resources: ResourcesSpec) -> Any:
        c = build_container("c1", DirRootfs(path="/r"), build_process(PROC), resources=resources)
        return msgspec.json.decode(encode_message(c))["constraints"]

    assert constraints_json(ResourcesSpec()) == {"CPUQuota": 0, "CPUPeriod": 0}
    assert constraints_json(ResourcesSpec(cpu_quota=5, cpu_period=10, cpu_shares=3)) == {
        "CPUQuota": 5,
        "CPUPeriod": 10,
        "CPUShares": 3,
    }


def test_fsmap_from_mounts_and_devices() -> None:
    volumes = [
        SharedMount("c1-0123456789abcdef-data", "/data", False, "/s/p/c1-0123456789abcdef-data"),
        SharedMount("c1-fedcba9876543210-conf", "/etc/conf", True, "/s/p/c1-fedcba9876543210-conf"),
    ]
    fsmap = fsmap_from_mounts(volumes)
    assert fsmap == [
        FsmapDescriptor(source="c1-0123456789abcdef-data", path="/data", read_only=False),
        FsmapDescriptor(source="c1-fedcba9876543210-conf", path="/etc/conf", read_only=True),
    ]
    devices = [
        DeviceSpec(guest_path="/dev/vdb", container_path="/dev/xvdb"),
        DeviceSpec(guest_path="/dev/sdc", container_path="/dev/disk1", scsi_addr="0:2"),
    ]
    c = build_container(
        "c1", DirRootfs(path="/r"), build_process(PROC), fsmap=fsmap, devices=devices
    )
    assert c.fsmap == [
        *fsmap,
        FsmapDescriptor(source="/dev/vdb", path="/dev/xvdb", absolute_path=True),
        FsmapDescriptor(source="/dev/sdc", path="/dev/disk1", absolute_path=True, scsi_addr="0:2"),
    ]


def test_bind_mount_dev() -> None:
    c = build_container("c1", DirRootfs(path="/r"), build_process(PROC), bind_mount_dev=True)
    assert c.system_mounts_info.bind_mount_dev is True
    assert (
        build_container(
            "c1", DirRootfs(path="/r"), build_process(PROC)
        ).system_mounts_info.bind_mount_dev
        is False
    )


CAPS = [
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
]


def test_newcontainer_bytes_cc_match_the_reference_transcript() -> None:
    spec = ProcessSpec(
        args=["/bin/sh", "-c", "echo hello && echo oops >&2"],
        env=[
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME=pod3",
            "GREETING=héllo",
        ],
        user="0",
        group="0",
        capabilities=CapabilitiesSpec(
            bounding=CAPS, effective=CAPS, inheritable=CAPS, permitted=CAPS, ambient=[]
        ),
    )
    volumes = [
        SharedMount(f"pod3-8fa1c2d3b4e5f607-{name}", f"/etc/{name}", False, "/x")
        for name in ("hostname", "hosts", "resolv.conf")
    ]
    c = build_container(
        "c3",
        DirRootfs(path="/r"),
        with_seqs(build_process(spec), 3, 4),
        fsmap=fsmap_from_mounts(volumes),
        sysctl={"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1"},
        dev_shm_size=67108864,
    )
    caps = b'["' + b'","'.join(c.encode() for c in CAPS) + b'"]'
    fsmap = b",".join(
        b'{"source":"pod3-8fa1c2d3b4e5f607-'
        + n
        + b'","path":"/etc/'
        + n
        + b'","readOnly":false,"dockerVolume":false,"absolutePath":false,"scsiAddr":""}'
        for n in (b"hostname", b"hosts", b"resolv.conf")
    )
    assert encode_message(c, CC) == (
        b'{"id":"c3","rootfs":"rootfs","image":"c3","fsmap":[' + fsmap + b"],"
        b'"sysctl":{"kernel.shm_rmid_forced":"1","net.ipv4.ip_forward":"1"},'
        b'"process":{"user":"0","group":"0","terminal":false,"stdio":3,"stderr":4,'
        b'"args":["/bin/sh","-c","echo hello \\u0026\\u0026 echo oops \\u003e\\u00262"],'
        b'"envs":[{"env":"PATH","value":"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},'
        b'{"env":"HOSTNAME","value":"pod3"},{"env":"GREETING","value":"h\xc3\xa9llo"}],'
        b'"workdir":"/","noNewPrivileges":false,"capabilities":{"bounding":'
        + caps
        + b',"effective":'
        + caps
        + b',"inheritable":'
        + caps
        + b',"permitted":'
        + caps
        + b',"ambient":[]}},"restartPolicy":"","initialize":false,'
        b'"systemMountsInfo":{"bindMountDev":false,"devShmSize":67108864},'
        b'"constraints":{"CPUQuota":0,"CPUPeriod":0}}'
    )


def test_newcontainer_bytes_hyper_match_the_real_agent_transcript() -> None:
    spec = ProcessSpec(args=["/bin/sleep", "100"], env=["PATH=/bin"])
    process = with_seqs(build_process(spec, HYPER), 1, 2)
    c = build_container("c1", DirRootfs(path="/r"), process, bind_mount_dev=True, dialect=HYPER)
    assert encode_message(c, HYPER) == (
        b'{"id":"c1","rootfs":"rootfs","image":"c1","process":{"id":"init","terminal":false,'
        b'"stdio":1,"stderr":2,"args":["/bin/sleep","100"],"envs":[{"env":"PATH","value":"/bin"}],'
        b'"workdir":"/"}}'
    )


def test_newcontainer_bytes_hyper_block_rootfs_and_volumes() -> None:
    process = with_seqs(build_process(PROC, HYPER), 1, 2)
    volumes = [SharedMount("c1-0123456789abcdef-d", "/d", True, "/x")]
    c = build_container(
        "c1",
        BlockRootfs(block=BlockDevice(index=1, fstype="ext4")),
        process,
        fsmap=fsmap_from_mounts(volumes),
        dialect=HYPER,
    )
    assert encode_message(c, HYPER) == (
        b'{"id":"c1","rootfs":"rootfs","fstype":"ext4","image":"vdb","fsmap":[{"source":'
        b'"c1-0123456789abcdef-d","path":"/d","readOnly":true,"dockerVolume":false}],'
        b'"process":{"id":"init","terminal":false,"stdio":1,"stderr":2,"args":["/bin/sh"],'
        b'"workdir":"/"}}'
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"resources": ResourcesSpec(cpu_shares=2)}, "resources"),
        ({"devices": [DeviceSpec(guest_path="/dev/vdb", container_path="/dev/b")]}, "devices"),
        (
            {
                "rootfs": BlockRootfs(
                    block=BlockDevice(index=0, fstype="ext4", driver="virtio-scsi")
                )
            },
            "rootfs.block.driver virtio-scsi",
        ),
    ],
)
def test_hyper_container_refuses_cc_only_features(kwargs: dict[str, Any], field: str) -> None:
    rootfs = kwargs.pop("rootfs", DirRootfs(path="/r"))
    with pytest.raises(InvalidParams, match="hyperhq") as info:
        build_container("c1", rootfs, build_process(PROC, HYPER), dialect=HYPER, **kwargs)
    assert info.value.data == {"field": field}


# --------------------------------------------------------------------------------------------
# commands on running containers


@pytest.mark.parametrize(
    ("msg", "dialect", "expected"),
    [
        (build_kill("c1", 15), CC, b'{"container":"c1","signal":15,"allProcesses":false}'),
        (build_kill("c1", 9, True), CC, b'{"container":"c1","signal":9,"allProcesses":true}'),
        (build_kill("c1", 15, True), HYPER, b'{"container":"c1","signal":15}'),
        (build_remove("c1"), CC, b'{"container":"c1"}'),
        (build_remove("c1"), HYPER, b'{"container":"c1"}'),
        (build_ps("c1"), CC, b'{"container":"c1","format":"table","psargs":null}'),
        (
            build_ps("c1", "json", ["-ef"]),
            CC,
            b'{"container":"c1","format":"json","psargs":["-ef"]}',
        ),
        (build_signal("c1", "ex2", 15), HYPER, b'{"container":"c1","process":"ex2","signal":15}'),
        (build_winsize(CC, seq=5, row=24, column=80), CC, b'{"seq":5,"row":24,"column":80}'),
        (
            build_winsize(HYPER, container_id="c1", process_id="ex3", row=33, column=111),
            HYPER,
            b'{"container":"c1","process":"ex3","row":33,"column":111}',
        ),
    ],
)
def test_command_bytes(msg: msgspec.Struct, dialect: Any, expected: bytes) -> None:
    assert encode_message(msg, dialect) == expected


def test_winsize_types() -> None:
    assert isinstance(build_winsize(CC, seq=1, row=1, column=1), WindowSize)
    assert isinstance(
        build_winsize(HYPER, container_id="c", process_id="init", row=1, column=1),
        WindowSizeMessage,
    )


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: build_kill("c1", -1), "signal"),
        (lambda: build_kill("c1", 65), "signal"),
        (lambda: build_signal("c1", "init", 100), "signal"),
        (lambda: build_ps("c1", "yaml"), "format"),
        (lambda: build_winsize(CC, seq=0, row=1, column=1), "seq"),
        (lambda: build_winsize(CC, seq=1, row=70000, column=1), "row"),
        (lambda: build_winsize(CC, seq=1, row=1, column=-1), "column"),
        (lambda: build_winsize(HYPER, row=1, column=1), "process"),
    ],
)
def test_command_validation(call: Any, field: str) -> None:
    with pytest.raises(InvalidParams) as info:
        call()
    assert info.value.data == {"field": field}


def test_seed_constants() -> None:
    assert agent.SHARE_TAG == "hyperShared"
    assert agent.MAX_HOSTNAME_LEN == 64
    assert agent.SUPPORTS_BLOCK_DEVICES is True
