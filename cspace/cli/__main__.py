"""``python -m cspace.cli``: the ``cspace`` command."""

import sys

from cspace.cli import main

sys.exit(main())
