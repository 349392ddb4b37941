"""`python -m ptlm ...` is the `ptlm` command."""

import sys

from ptlm.cli import main

sys.exit(main())
