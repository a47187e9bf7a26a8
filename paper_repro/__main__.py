"""`python -m paper_repro`: see paper_repro.compare."""

import sys

from paper_repro.compare import main

sys.exit(main())
