"""The pod daemon: pods, containers and exec processes over per-VM proxy connections.

- :mod:`hyperd.daemon.model`: the persisted records and their state machines;
- :mod:`hyperd.daemon.service`: :class:`Daemon` (registry, pod lifecycle, VM links, adoption);
- :mod:`hyperd.daemon.containers`: container and exec operations;
- :mod:`hyperd.daemon.api`: the JSON-RPC method table (API v1);
- :mod:`hyperd.daemon.launcher`: helper processes (simulated VMs, per-pod proxies);
- :mod:`hyperd.daemon.events`: the event bus behind ``events.subscribe``;
- :mod:`hyperd.daemon.serve`: :func:`serve`, the service lifecycle.
"""
