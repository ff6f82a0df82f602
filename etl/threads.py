"""The threads the product starts leave SIGTERM and SIGINT to the main one."""

from __future__ import annotations

import signal


def leave_signals_to_the_main_thread() -> None:
    """Block SIGTERM and SIGINT in this thread and the threads it starts.

    Python runs a signal's handler in the main thread only. A signal that
    the kernel gave to another thread waited until the main thread woke on
    its own: a daemon waiting for its run to end answered a second SIGTERM
    only after half a minute. Blocked in every other thread, a signal goes
    to the main thread and ends its wait at once.
    """
    if hasattr(signal, "pthread_sigmask"):  # not on Windows
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
