"""The pod daemon: pods, containers and exec processes over per-VM proxy connections.

- :mod:`~hyperd.daemon.model`: the persisted records (msgspec Structs) and their state machines;
- :mod:`~hyperd.daemon.service`: :class:`Daemon` (registry, persistence, pod lifecycle, VM links);
- :mod:`~hyperd.daemon.containers`: container and exec operations;
- :mod:`~hyperd.daemon.adoption`: reload and reconcile after a restart or a crash;
- :mod:`~hyperd.daemon.api`: the JSON-RPC method table (API v1, with its reference);
- :mod:`~hyperd.daemon.serve`: :func:`serve`, the service lifecycle (sd_notify, signals);
- :mod:`~hyperd.daemon.vmlink` / :mod:`~hyperd.daemon.vmadapter`: what the daemon needs from a
  VM, on top of :class:`hyperd.vm.VMSession`;
- :mod:`~hyperd.daemon.bridge`: records → agent messages (:mod:`hyperd.agent`), host mounts
  (:mod:`hyperd.host`), agent calls with errors naming the pod;
- :mod:`~hyperd.daemon.launcher`: helper processes (simulated VMs, per-pod proxies);
- :mod:`~hyperd.daemon.netprobe`: network discovery in a child process;
- :mod:`~hyperd.daemon.events`: the event bus behind ``events.subscribe``;
- :mod:`~hyperd.daemon.podfs`, :mod:`~hyperd.daemon.testhooks`: pod directories; test hooks.
"""
