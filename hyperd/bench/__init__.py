"""Benchmarks of hyperd against the seed's design: ``python -m hyperd.bench`` (or ``hyperd bench``).

``main(argv) -> int`` runs the scenarios of issue 6 and prints a table of medians and ratios
measured in the same run:

1. command throughput on one VM: the seed's connect-per-command pattern (A), one command at a
   time (B), hyperd's :class:`~hyperd.vm.VMSession` with N concurrent callers, the raw pipelined
   limit, and the agent round trip alone (the proxy's own cost);
2. RPC latency through the daemon vs the same agent command sent directly to the proxy;
3. scale: N pods held by one daemon (RSS per VM, RPC p99 under mixed load, create/start time);
4. container lifecycle through the daemon vs a seed-pattern driver.

Modules: :mod:`.cli` (arguments, settings, the run), :mod:`.procs` (helper processes that die
with the run), :mod:`.topology` (temp dir, sims, proxies), :mod:`.wire` (lean protocol clients),
:mod:`.stats` (medians, table), one module per scenario, :mod:`.plot` (optional PNG).
"""

from hyperd.bench.cli import main

__all__ = ["main"]
