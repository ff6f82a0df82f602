"""The `task-etl` command, which a Ctrl-C ends quietly even while it loads.

Loading the command's modules takes about a second, before the command
can answer a signal itself: a Ctrl-C then printed a traceback of the
imports.
"""

from __future__ import annotations

import sys

# The exit code of a command stopped by a signal before it did anything.
STOPPED = 130


def main() -> None:
    try:
        from etl.cli import main as command
    except KeyboardInterrupt:
        sys.exit(STOPPED)
    command()
