"""``python -m memloc`` runs the ``memloc`` command."""

import sys

from .cli import main

sys.exit(main())
