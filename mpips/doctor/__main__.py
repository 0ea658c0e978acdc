"""``python -m mpips.doctor``: see ``mpips.doctor``."""

import sys

from mpips.doctor.cli import main

sys.exit(main())
