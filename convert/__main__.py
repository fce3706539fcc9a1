"""`python -m convert ...`: the same as the `convert` console script (see convert.cli)."""

import sys

from convert.cli import main

sys.exit(main())
