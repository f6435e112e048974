import sys

from hyperd.image.cli import main

sys.exit(main())
