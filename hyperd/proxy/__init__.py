"""hyperd-proxy: a proxy compatible on the wire with the reference cc-proxy 3.0.23.

Runtime clients and shims speak the cc-proxy protocol (``protocol.ccproxy``) to it; it speaks
the hyperstart agent protocol (``protocol.hyperstart``, CC or hyperhq dialect) to each VM's
ctl and tty channels. Same frames, same error texts as the reference; none of its crashes,
leaks or wedges (tokens freed with their VM, an unknown command or an oversized frame answered
without wedging the VM, in-flight commands answered when the VM dies, deadlines on READY, agent
replies, shims and process starts).

Modules: :mod:`.server` (registry, lifecycle), :mod:`.client` (one client connection, runtime
commands), :mod:`.shim` (shim commands and streams), :mod:`.vm` (agent channels, output
routing, VM loss), :mod:`.ctlqueue` (agent command queue), :mod:`.sessions` (tokens),
:mod:`.relocate` (newcontainer/execcmd seqs), :mod:`.gojson` (Go decoding and error texts),
:mod:`.texts` (error texts), :mod:`.cli` (``hyperd-proxy``).

One agent command is outstanding per VM at a time, as with the reference: a client may
pipeline, but its commands are handled in order and the agent sees them one after another.
"""

from hyperd.proxy.server import Proxy, ProxyConfig

__all__ = ["Proxy", "ProxyConfig"]
