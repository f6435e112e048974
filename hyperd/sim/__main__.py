"""``python -m hyperd.sim``: run the simulated VM."""

from hyperd.sim.cli import main

raise SystemExit(main())
