"""ptlm: fine-tune or continue pretraining causal LMs on the GPUs you have."""

__version__ = "0.1.0"
