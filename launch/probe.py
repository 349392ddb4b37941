"""Confirm a plan on the real device: the largest micro-batch that fits, measured.

    deepspeed launch/probe.py --model facebook/opt-125m --seq-len 1024 --global-batch 16
    DS_ACCELERATOR=cpu python launch/probe.py ... --simulate-gpu-memory 16GiB   # CPU rehearsal
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, too

from ptlm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["probe", *sys.argv[1:]]))
