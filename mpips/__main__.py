"""``python -m mpips`` is ``python -m mpips.train``."""

import sys

from mpips.train import main

sys.exit(main())
