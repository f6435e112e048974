import sys

from hyperd.guest.cli import main

sys.exit(main())
