import sys

from hyperd.shim.cli import main

sys.exit(main())
