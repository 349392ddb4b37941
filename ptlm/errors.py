"""User-facing errors: the CLI prints the message (no traceback) and exits non-zero."""


class PtlmError(Exception):
    """An error caused by the user's input or environment, with a message that says the fix."""

    exit_code = 2
