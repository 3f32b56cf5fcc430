"""`python -m phi3v ...`: the same command line as `phi3v ...`."""

import sys

from phi3v.cli import main

sys.exit(main())
