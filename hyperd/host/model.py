"""What network discovery reports about a namespace: links, their addresses and their routes.

Plain frozen dataclasses, both address families kept: deciding what the agent can use (IPv4 only,
no loopback) is :func:`hyperd.agent.build_interfaces_and_routes`'s job, not discovery's.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HostAddress:
    """One address of a link: ``family`` is ``socket.AF_INET`` or ``socket.AF_INET6``."""

    family: int
    address: str
    prefix_len: int

    @property
    def is_ipv4(self) -> bool:
        return self.family == socket.AF_INET


@dataclass(frozen=True, slots=True)
class HostRoute:
    """A route through a link.

    ``destination`` is a CIDR (``"0.0.0.0/0"`` for the IPv4 default route, ``"::/0"`` for IPv6's)
    or ``None`` when unknown; ``gateway`` is ``None`` for a directly connected route.
    """

    family: int
    destination: str | None
    gateway: str | None
    device: str

    @property
    def is_ipv4(self) -> bool:
        return self.family == socket.AF_INET


@dataclass(frozen=True, slots=True)
class HostLink:
    """A network interface: name, MTU, MAC (``"aa:bb:…"``, ``""`` if none), whether it is a
    loopback device, its addresses and the routes that leave through it."""

    name: str
    mtu: int
    mac: str
    loopback: bool = False
    addresses: tuple[HostAddress, ...] = ()
    routes: tuple[HostRoute, ...] = ()


@dataclass(frozen=True, slots=True)
class HostNetwork:
    """All links of a network namespace, in kernel index order."""

    links: tuple[HostLink, ...] = ()

    def link(self, name: str) -> HostLink:
        """The link called ``name``; ``KeyError`` if there is none."""
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class SharedMount:
    """A volume bind-mounted into a pod's share: ``source`` is its name relative to the share
    (what the fsmap entry carries), ``destination`` its path in the container, ``host_path``
    where it is mounted on the host."""

    source: str
    destination: str
    read_only: bool
    host_path: str
