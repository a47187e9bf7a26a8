"""`python -m pml_cli`: the `pml` command."""

import sys

from pml_cli.main import main

sys.exit(main())
