"""Train a causal LM with DeepSpeed on prepared data: one GPU, several, several nodes, or CPU.

    deepspeed launch/train.py --model facebook/opt-125m --data data/pt-1024 --out runs/opt
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train.py ...      # two CPU ranks
    python launch/train.py ...                                          # one process
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, too

from ptlm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
