"""`python -m serving ...`: the command line (see serving/cli.py)."""

import sys

from serving.cli import main

sys.exit(main())
