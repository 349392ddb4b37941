"""The run: its config, the one engine builder (used by training and the probe), the training
loop, checkpoints, evaluation, export, report, distributed helpers and hardware detection."""
