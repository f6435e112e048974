"""hyperd's agent inside a VM (``hyperd-agent guest``): see :mod:`hyperd.guest.agent`.

The names the image and the agent share live here (importing this package is cheap: the
guest's ``/init`` and the image build both use them).
"""

__all__ = ["CTL_PORT", "SHARE_MOUNT", "TTY_PORT"]

CTL_PORT = "/dev/virtio-ports/sh.hyper.channel.0"
TTY_PORT = "/dev/virtio-ports/sh.hyper.channel.1"
SHARE_MOUNT = "/run/hyperd/share"  # where the guest mounts the pod's 9p share
