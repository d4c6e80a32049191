"""`python -m defectflow.cli`: the `defectflow` command."""

import sys

from defectflow.cli import main

sys.exit(main())
