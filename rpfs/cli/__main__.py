"""`python -m rpfs.cli`: what the daemon is started with when no `rpfs` script is on PATH."""

import sys

from .main import main

sys.exit(main())
