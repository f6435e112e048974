"""The ``delete`` action's work: release what a task held after its shim is gone.

containerd runs ``delete`` after every task teardown (the shim has already cleaned up: nothing
is left to do), when a shim died, and at its own start for bundles whose shim cannot be reached.
It must be idempotent and quick. The rootfs mount in the bundle is always undone. hyperd is only
asked to remove the pod when the pod's shim does not answer on its socket: a living shim still
serves the pod's other tasks and cleans up itself.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import anyio

from hyperd.shim import bundle as bundles
from hyperd.shim.events import timestamp
from hyperd.shim.proto import shim_pb2

log = logging.getLogger(__name__)


def delete_response(exit_status: int, at: float) -> bytes:
    return shim_pb2.DeleteResponse(
        pid=0, exit_status=exit_status, exited_at=timestamp(at)
    ).SerializeToString()


def cleanup(args: Any, bundle: str, *, deadline: float) -> None:
    """Unmount ``<bundle>/rootfs``; if the pod's shim is gone, remove the pod from hyperd."""
    from hyperd.shim.cli import _alive, hyperd_socket, socket_address

    bundles.unmount(os.path.join(bundle, "rootfs"))
    try:
        spec = bundles.read_config(bundle)
    except bundles.BundleError:
        return
    key = bundles.group_key(spec, args.id)
    if _alive(socket_address(args.address, args.namespace, key).removeprefix("unix://")):
        return
    pod = bundles.pod_id(args.namespace, key)
    anyio.run(_forget, hyperd_socket(), pod, deadline)


async def _forget(socket: str, pod: str, deadline: float) -> None:
    """Stop and delete ``pod``. Its shim is gone, so every task of the pod has lost its shim
    (one shim serves the whole pod) and containerd cleans each of them up: the first ``delete``
    removes the pod, the others find nothing left."""
    from hyperd.shim.hyperd_api import HyperdAPI, HyperdError

    api = HyperdAPI(socket)
    with anyio.move_on_after(deadline):
        for method in ("pod.stop", "pod.delete"):
            try:
                await api.call(method, {"id": pod})
            except HyperdError as exc:
                if exc.kind == "not_found":
                    return
                print(exc.message, file=sys.stderr)
