"""The model: one resolver from a spec to a config (`config`), loading in a precision (`load`),
the chunked LM loss (`loss`) and the optimizers (`optim`). Uses the planner's Setting; knows no run.
"""
