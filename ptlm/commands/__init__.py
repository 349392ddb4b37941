"""One module per CLI command, each with `add_arguments(parser)` and `run(args) -> int`; the
flags shared by several commands are declared once, in `flags`."""
