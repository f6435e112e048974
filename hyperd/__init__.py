"""hyperd: a pod daemon for VM-isolated containers."""

__version__ = "0.1.0"
