"""``python -m m6`` is the `m6` command."""

import sys

from m6.cli import main

sys.exit(main())
