"""``python -m preforkd``: the same as the ``preforkd`` console script."""

import sys

from .cli import main

sys.exit(main())
