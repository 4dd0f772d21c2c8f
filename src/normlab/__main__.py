"""``python -m normlab``: the ``normlab`` command line without the console script."""

import sys

from .cli import main

sys.exit(main())
