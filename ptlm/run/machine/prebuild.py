"""`python -m ptlm.run.machine.prebuild`: check DeepSpeed's op locks, then build its ops once
(scripts/env.sh and the docker image run it at install time). Its own module: ptlm.run imports
oplocks on every start, and running an already imported module with -m makes runpy warn."""

import logging
import sys

from ptlm.errors import PtlmError
from ptlm.run.machine.oplocks import prebuild_ops

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[ptlm %(levelname)s] %(message)s")
    try:
        print("prebuilt DeepSpeed ops:", ", ".join(prebuild_ops()) or "none")
    except PtlmError as e:
        print(f"ptlm: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
