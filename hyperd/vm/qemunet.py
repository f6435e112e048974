"""A VM's network in the pod's netns: a tap joined to the pod's veth by tc mirred redirects.

As VM runtimes do (kata's ``tcfilter`` model): the pod's veth keeps its place and its address in
the netns; a tap is created next to it, and an ingress ``u32`` filter on each redirects every
frame to the other (``mirred egress redirect``), so the guest's NIC, which gets the veth's MAC,
is on the wire in the veth's place. The guest agent puts the veth's addresses and routes on it
(STARTPOD). Done with ``ip`` and ``tc`` run in the netns through ``nsenter``.
"""

from __future__ import annotations

import json

import anyio

from hyperd.errors import VMUnavailable

__all__ = ["TAP_NAME", "setup", "teardown"]

TAP_NAME = "hyperd-tap0"  # one VM per netns: a fixed name inside it


async def _run(netns: str, *argv: str, check: bool = True) -> str:
    done = await anyio.run_process(["nsenter", f"--net={netns}", "--", *argv], check=False)
    if check and done.returncode != 0:
        raise VMUnavailable(
            f"netns {netns}: {' '.join(argv)}: {done.stderr.decode(errors='replace').strip()}"
        )
    return done.stdout.decode()


async def pod_interface(netns: str) -> tuple[str, str]:
    """The name and MAC of the netns's interface that carries an IPv4 address (not lo)."""
    links = json.loads(await _run(netns, "ip", "-j", "addr", "show"))
    for link in links:
        if link.get("ifname") in ("lo", TAP_NAME) or "LOOPBACK" in link.get("flags", []):
            continue
        if any(a.get("family") == "inet" for a in link.get("addr_info", [])):
            return str(link["ifname"]), str(link["address"])
    raise VMUnavailable(f"netns {netns}: no interface with an IPv4 address for the VM")


async def setup(netns: str) -> tuple[str, str]:
    """Create the tap and the two redirects; returns (tap name, MAC for the guest's NIC)."""
    veth, mac = await pod_interface(netns)
    await teardown(netns)  # a leftover of a crash
    await _run(netns, "ip", "tuntap", "add", "dev", TAP_NAME, "mode", "tap")
    await _run(netns, "ip", "link", "set", TAP_NAME, "up")
    for here, there in ((veth, TAP_NAME), (TAP_NAME, veth)):
        await _run(netns, "tc", "qdisc", "add", "dev", here, "ingress")
        await _run(
            netns,
            "tc",
            "filter",
            "add",
            "dev",
            here,
            "parent",
            "ffff:",
            "protocol",
            "all",
            "u32",
            "match",
            "u8",
            "0",
            "0",
            "action",
            "mirred",
            "egress",
            "redirect",
            "dev",
            there,
        )
    return TAP_NAME, mac


async def teardown(netns: str) -> None:
    """Remove the tap and the pod veth's ingress qdisc (no error when they are not there).

    The veth's ingress qdisc is hyperd's while the VM runs (it holds the redirect to the tap).
    """
    await _run(netns, "ip", "link", "del", TAP_NAME, check=False)
    try:
        veth, _ = await pod_interface(netns)
    except VMUnavailable:
        return  # the netns is gone or has no pod interface: nothing of ours is left
    await _run(netns, "tc", "qdisc", "del", "dev", veth, "ingress", check=False)
