"""Host side of a pod: network discovery in a netns and bind mounts into the shared dir.

Everything here is synchronous (it makes blocking system calls); the daemon runs it in a worker
thread with ``anyio.to_thread.run_sync``. :mod:`hyperd.host.model` holds the plain data types the
discovery returns, so that :mod:`hyperd.agent` can use them without importing pyroute2.
"""

from hyperd.host.model import HostAddress, HostLink, HostNetwork, HostRoute, SharedMount

__all__ = ["HostAddress", "HostLink", "HostNetwork", "HostRoute", "SharedMount"]
