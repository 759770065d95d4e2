"""``python -m apflab`` — same as the ``apflab`` console script."""

import sys

from apflab.cli.main import main

sys.exit(main())
