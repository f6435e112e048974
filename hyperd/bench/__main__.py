import sys

from hyperd.bench.cli import main

sys.exit(main())
