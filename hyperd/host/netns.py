"""Network discovery in a network namespace with pyroute2.

:func:`read_network` is synchronous: it opens ``IPRoute(netns=path, flags=0)``, reads links,
addresses and main-table routes, and closes the socket before returning. ``flags=0`` matters: with
pyroute2's default flags a missing namespace is silently *created*. :func:`discover_network` runs
it in a worker thread, because pyroute2's async API does not work under uvloop.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Iterable
from typing import Any

import anyio.to_thread

from hyperd.errors import HyperdError, InvalidParams
from hyperd.host.model import HostAddress, HostLink, HostNetwork, HostRoute
from hyperd.spec import check_absolute_path

__all__ = ["discover_network", "read_network"]

log = logging.getLogger(__name__)

MAIN_TABLE = 254  # RT_TABLE_MAIN: the routes a pod's interfaces are configured with
RTN_UNICAST = 1  # local/broadcast/multicast routes are the kernel's business, not the agent's
IFF_LOOPBACK = 0x8  # from <net/if.h>
NO_FLAGS = 0  # pyroute2 netns flags: neither O_CREAT nor O_EXCL, so a missing netns is an error
NS_GET_NSTYPE = 0xB703  # ioctl on a namespace file (<linux/nsfs.h>): returns its CLONE_NEW* type
CLONE_NEWNET = 0x40000000  # from <sched.h>
DEFAULT_ROUTE: dict[int, str] = {int(socket.AF_INET): "0.0.0.0/0", int(socket.AF_INET6): "::/0"}


def read_network(netns_path: str) -> HostNetwork:
    """Read the links, addresses and routes of the network namespace at ``netns_path``.

    Returns every link (loopback included, flagged), both address families, and the unicast
    routes of the main table grouped under the link they leave through.

    Raises ``InvalidParams`` (field ``netns``) if the path is not absolute, does not exist or is
    not a network namespace, and ``HyperdError`` for other netlink failures. Must not be called
    from a thread running an event loop (pyroute2 runs its own loop): ``RuntimeError`` there.
    """
    if _loop_running():
        raise RuntimeError("read_network blocks: use discover_network() from async code")
    check_absolute_path("netns", netns_path)
    _check_is_netns(netns_path)
    from pyroute2 import IPRoute  # deferred: a heavy import the pure modules do not need

    try:
        ipr = IPRoute(netns=netns_path, flags=NO_FLAGS)
    except OSError as exc:
        raise _netns_error(netns_path, exc) from exc
    try:
        links = list(ipr.get_links())
        addrs = list(ipr.get_addr())
        routes = list(ipr.get_routes(table=MAIN_TABLE))
    except OSError as exc:
        raise HyperdError(f"reading network namespace {netns_path!r} failed: {exc}") from exc
    finally:
        ipr.close()
    return _assemble(links, addrs, routes)


async def discover_network(netns_path: str) -> HostNetwork:
    """:func:`read_network` in a worker thread (same result, same errors).

    Not for a process that handles signals on its event loop: pyroute2 forks a helper to enter
    the namespace, the helper inherits the loop's signal wakeup fd, and a signal sent to the
    helper then reaches the loop as if sent to the process. The daemon therefore reads the netns
    in a fresh interpreter (:mod:`hyperd.daemon.netprobe`); this is for tools and tests.
    """
    return await anyio.to_thread.run_sync(read_network, netns_path)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _check_is_netns(path: str) -> None:
    """Refuse anything but a network namespace before pyroute2 sees it: pyroute2 leaks a socket
    pair and an event loop when it fails to enter a namespace."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _netns_error(path, exc) from exc
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        raise _netns_error(path, exc) from exc
    finally:
        os.close(fd)
    if nstype != CLONE_NEWNET:
        raise InvalidParams(f"{path!r} is not a network namespace", field="netns")


def _netns_error(path: str, exc: OSError) -> HyperdError:
    if exc.errno == errno.ENOENT:
        return InvalidParams(f"network namespace {path!r} does not exist", field="netns")
    if exc.errno in (errno.EINVAL, errno.ENOTTY):  # ENOTTY: ioctl on a non-nsfs file
        return InvalidParams(f"{path!r} is not a network namespace", field="netns")
    return HyperdError(f"cannot enter network namespace {path!r}: {exc}")


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def _assemble(links: Iterable[Any], addrs: Iterable[Any], routes: Iterable[Any]) -> HostNetwork:
    names: dict[int, str] = {}
    order: list[int] = []
    base: dict[int, tuple[str, int, str, bool]] = {}
    for link in links:
        index = int(link["index"])
        name = str(_attr(link, "IFLA_IFNAME"))
        names[index] = name
        order.append(index)
        base[index] = (
            name,
            int(_attr(link, "IFLA_MTU") or 0),
            str(_attr(link, "IFLA_ADDRESS") or ""),
            bool(int(link["flags"]) & IFF_LOOPBACK),
        )
    by_link_addrs: dict[int, list[HostAddress]] = {i: [] for i in order}
    for addr in addrs:
        index = int(addr["index"])
        # IFA_LOCAL is the interface's own address on point-to-point links; else IFA_ADDRESS
        ip = _attr(addr, "IFA_LOCAL") or _attr(addr, "IFA_ADDRESS")
        if index in by_link_addrs and ip:
            by_link_addrs[index].append(
                HostAddress(int(addr["family"]), str(ip), int(addr["prefixlen"]))
            )
    by_link_routes: dict[int, list[HostRoute]] = {i: [] for i in order}
    for route in routes:
        for index, r in _expand_route(route, names):
            by_link_routes[index].append(r)
    return HostNetwork(
        links=tuple(
            HostLink(
                name=base[i][0],
                mtu=base[i][1],
                mac=base[i][2],
                loopback=base[i][3],
                addresses=tuple(by_link_addrs[i]),
                routes=tuple(by_link_routes[i]),
            )
            for i in order
        )
    )


def _expand_route(route: Any, names: dict[int, str]) -> list[tuple[int, HostRoute]]:
    """One ``(link index, HostRoute)`` per next hop of a main-table unicast route."""
    if int(route["type"]) != RTN_UNICAST:
        return []
    table = _attr(route, "RTA_TABLE") or route["table"]
    if int(table) != MAIN_TABLE:
        return []
    family = int(route["family"])
    dst = _attr(route, "RTA_DST")
    dst_len = int(route["dst_len"])
    if dst is None and dst_len == 0:
        destination: str | None = DEFAULT_ROUTE.get(family)
    else:
        destination = f"{dst}/{dst_len}" if dst is not None else None
    hops: list[tuple[Any, Any]] = []
    multipath = _attr(route, "RTA_MULTIPATH")
    if multipath:
        hops = [(hop["oif"], _attr(hop, "RTA_GATEWAY")) for hop in multipath]
    else:
        hops = [(_attr(route, "RTA_OIF"), _attr(route, "RTA_GATEWAY"))]
    out = []
    for oif, gateway in hops:
        if oif is None or int(oif) not in names:
            log.debug("route %s has no known output device; skipped", destination)
            continue
        out.append(
            (
                int(oif),
                HostRoute(
                    family=family,
                    destination=destination,
                    gateway=str(gateway) if gateway else None,
                    device=names[int(oif)],
                ),
            )
        )
    return out
