"""``python -m hyperd``: the ``hyperd`` command (``python -m hyperd serve``)."""

import sys

from hyperd.cli.daemon import main

sys.exit(main())
