"""``python -m bbfused.train``."""

import sys

from .entry import main

sys.exit(main())
