"""``python -m hyperd.proxy``: run hyperd-proxy."""

import sys

from hyperd.proxy.cli import main

sys.exit(main())
