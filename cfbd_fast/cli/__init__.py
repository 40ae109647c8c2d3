"""The `cfbd-fast` command line: one module per command group, wired together in main.py."""
