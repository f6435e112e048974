"""Network discovery in a real network namespace (root: `ip netns add`, veth pair)."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread
import pytest

from hyperd.agent import build_interfaces_and_routes, build_pod
from hyperd.errors import InvalidParams
from hyperd.host.model import HostAddress, HostRoute
from hyperd.host.netns import discover_network, read_network
from protocol.hyperstart import IPAddress, NetworkIface, Route, encode_message

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ip netns"),
]

MAC = "02:00:00:00:00:0a"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace with a veth pair: v0 (MTU 1400, fixed MAC, IPv4 + IPv6, default routes) and
    v1 (up, link-local only). Removed even when the test fails."""
    name = f"hdt-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        ip("-n", name, "link", "set", "v0", "mtu", "1400", "address", MAC, "up")
        ip("-n", name, "link", "set", "v1", "up")
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "addr", "add", "10.9.0.2/24", "dev", "v0")
        ip("-n", name, "addr", "add", "fd00:9::2/64", "dev", "v0", "nodad")
        ip("-n", name, "route", "add", "default", "via", "10.9.0.1")
        ip("-n", name, "route", "add", "192.168.7.0/24", "via", "10.9.0.3")
        ip("-n", name, "-6", "route", "add", "default", "via", "fd00:9::1", "dev", "v0")
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def test_read_network_reports_links_addresses_routes(netns: str) -> None:
    net = read_network(netns)
    assert sorted(link.name for link in net.links) == ["lo", "v0", "v1"]
    v0 = net.link("v0")
    assert (v0.mtu, v0.mac, v0.loopback) == (1400, MAC, False)
    ipv4 = [a for a in v0.addresses if a.is_ipv4]
    assert ipv4 == [HostAddress(socket.AF_INET, "10.9.0.2", 24)]
    ipv6 = {a.address for a in v0.addresses if not a.is_ipv4}
    assert "fd00:9::2" in ipv6
    routes4 = {r for r in v0.routes if r.is_ipv4}
    assert routes4 == {
        HostRoute(socket.AF_INET, "0.0.0.0/0", "10.9.0.1", "v0"),
        HostRoute(socket.AF_INET, "10.9.0.0/24", None, "v0"),
        HostRoute(socket.AF_INET, "192.168.7.0/24", "10.9.0.3", "v0"),
    }
    assert HostRoute(socket.AF_INET6, "::/0", "fd00:9::1", "v0") in v0.routes
    lo = net.link("lo")
    assert lo.loopback
    assert HostAddress(socket.AF_INET, "127.0.0.1", 8) in lo.addresses
    assert lo.routes == ()  # loopback routes live in the local table
    assert all(not r.is_ipv4 for r in net.link("v1").routes)


def test_read_network_does_not_leak_file_descriptors(netns: str) -> None:
    read_network(netns)
    with warnings.catch_warnings():  # garbage of earlier tests is not this test's business
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(5):
        read_network(netns)
    assert set(os.listdir("/proc/self/fd")) - before == set()


def test_missing_netns_is_an_error_and_is_not_created() -> None:
    path = f"/run/netns/hdt-missing-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with pytest.raises(InvalidParams, match="does not exist") as info:
        read_network(path)
    assert info.value.data == {"field": "netns"}
    assert not os.path.exists(path)


def test_not_a_netns(tmp_path: Path) -> None:
    f = tmp_path / "plain"
    f.write_text("")
    with pytest.raises(InvalidParams, match="not a network namespace"):
        read_network(str(f))


@pytest.mark.parametrize("path", ["relative/ns", "", "/run/netns/a\x00b"])
def test_bad_paths(path: str) -> None:
    with pytest.raises(InvalidParams, match="netns"):
        read_network(path)


@pytest.mark.anyio
async def test_discover_network_in_a_thread(netns: str, anyio_backend: object) -> None:
    net = await discover_network(netns)
    assert net == await anyio.to_thread.run_sync(read_network, netns)
    assert {a.address for a in net.link("v0").addresses} >= {"10.9.0.2", "fd00:9::2"}
    with pytest.raises(RuntimeError, match="discover_network"):
        read_network(netns)  # blocking call on the event loop thread is refused
    with pytest.raises(InvalidParams):
        await discover_network(netns + "-gone")


def test_discovered_network_gives_exactly_the_ipv4_data(netns: str) -> None:
    ifaces, routes = build_interfaces_and_routes(read_network(netns))
    v0 = [i for i in ifaces if i.new_device_name == "v0"]
    assert v0 == [
        NetworkIface(
            new_device_name="v0",
            ip_addresses=[IPAddress(ip_address="10.9.0.2", net_mask="24")],
            mtu=1400,
            mac_addr=MAC,
        )
    ]
    assert sorted(i.new_device_name for i in ifaces) == ["v0", "v1"]  # lo skipped
    assert sorted(routes, key=lambda r: r.dest) == [
        Route(dest="10.9.0.0/24", gateway="", device="v0"),
        Route(dest="192.168.7.0/24", gateway="10.9.0.3", device="v0"),
        Route(dest="default", gateway="10.9.0.1", device="v0"),
    ]
    assert b"fd00" not in encode_message(build_pod("p", ifaces, routes))
