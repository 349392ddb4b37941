"""The run: its config, the one engine builder (used by training and the probe), the training
loop, checkpoints, evaluation, export, report, distributed helpers and hardware detection."""

from ptlm.run.machine.oplocks import use_own_ninja

# Every process that may build DeepSpeed ops goes through ptlm.run: the ops are built with this
# environment's ninja however the process was started (not activated, another ninja on PATH),
# so the ones scripts/env.sh prebuilt are never compiled again (oplocks.use_own_ninja).
use_own_ninja()
