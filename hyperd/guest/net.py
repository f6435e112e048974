"""STARTPOD's interfaces and routes applied to the guest's own network stack with pyroute2.

An interface is found by its MAC address (the host gives the VM's NIC the MAC of the pod's veth),
else by its device name; it is renamed to ``new_device_name`` when given, gets its MTU and
addresses, and is brought up. Routes follow: ``dest`` a CIDR or ``"default"``, an optional
gateway, an optional device (by its name in the guest). Uses the sync ``IPRoute`` (the async API
does not work under uvloop); call it in a worker thread.
"""

from __future__ import annotations

import errno
import ipaddress
import logging

from protocol.hyperstart import NetworkIface, Route

__all__ = ["NetworkError", "apply_network"]

log = logging.getLogger(__name__)


class NetworkError(Exception):
    """An interface or route of STARTPOD cannot be applied; the message names it."""


def _prefix(mask: str) -> int:
    try:
        if "." in mask:
            return ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
        return int(mask)
    except ValueError:
        raise NetworkError(f"invalid netmask {mask!r}") from None


def _find_link(ipr: object, iface: NetworkIface) -> int:
    links = ipr.get_links()  # type: ignore[attr-defined]
    mac = iface.mac_addr.lower()
    for link in links:
        if mac and (link.get_attr("IFLA_ADDRESS") or "").lower() == mac:
            return int(link["index"])
    for link in links:
        if iface.device and link.get_attr("IFLA_IFNAME") == iface.device:
            return int(link["index"])
    raise NetworkError(f"no guest interface with MAC {iface.mac_addr!r} or name {iface.device!r}")


def apply_network(interfaces: list[NetworkIface], routes: list[Route]) -> None:
    """Configure ``interfaces`` then ``routes``; raises :class:`NetworkError`."""
    if not interfaces and not routes:
        return
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        names: dict[str, int] = {}
        for iface in interfaces:
            index = _find_link(ipr, iface)
            name = iface.new_device_name or iface.device
            try:
                ipr.link("set", index=index, state="down")
                if name:
                    ipr.link("set", index=index, ifname=name)
                    names[name] = index
                if iface.mtu:
                    ipr.link("set", index=index, mtu=iface.mtu)
                for addr in iface.ip_addresses or ():
                    try:
                        ipr.addr(
                            "add",
                            index=index,
                            address=addr.ip_address,
                            prefixlen=_prefix(addr.net_mask),
                        )
                    except NetlinkError as exc:
                        if exc.code != errno.EEXIST:
                            raise
                ipr.link("set", index=index, state="up")
            except NetlinkError as exc:
                raise NetworkError(f"interface {name or iface.device!r}: {exc}") from None
            log.info("interface %s up: %s", name, [a.ip_address for a in iface.ip_addresses or ()])
        for route in routes:
            spec: dict[str, object] = {}
            dest = route.dest or "default"
            if dest == "default":
                spec["dst"] = "0.0.0.0/0"
            else:
                try:
                    net = ipaddress.ip_network(dest, strict=False)
                except ValueError:
                    raise NetworkError(f"route: invalid destination {dest!r}") from None
                spec["dst"] = str(net)
            if route.gateway:
                spec["gateway"] = route.gateway
            if route.device:
                found = names.get(route.device)
                if found is None:
                    looked_up = ipr.link_lookup(ifname=route.device)
                    if not looked_up:
                        raise NetworkError(f"route {dest}: no guest device {route.device!r}")
                    found = int(looked_up[0])
                spec["oif"] = found
            try:
                ipr.route("replace", **spec)
            except NetlinkError as exc:
                raise NetworkError(f"route {dest} via {route.gateway or '-'}: {exc}") from None
            log.info("route %s via %s dev %s", dest, route.gateway or "-", route.device or "-")
