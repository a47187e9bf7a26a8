"""`python -m experiments latency|memory|quality [...]` (the same commands as `pml bench`)."""

import sys

from experiments.cli import main

sys.exit(main())
