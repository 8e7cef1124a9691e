"""`python -m csm ...`: the same as the `csm` command."""

import sys

from .cli import main

sys.exit(main())
