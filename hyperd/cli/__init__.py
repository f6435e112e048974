"""Command-line programs: ``hyperd`` (the daemon) and ``hyperctl`` (its client)."""
