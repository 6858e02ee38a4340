"""Entry point of `python -m security`; all logic is in security.cli."""

import sys

from security.cli import main

sys.exit(main())
