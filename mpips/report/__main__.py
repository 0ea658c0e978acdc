"""``python -m mpips.report``: see ``mpips.report``."""

import sys

from mpips.report.cli import main

sys.exit(main())
