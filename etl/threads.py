"""The threads the product starts leave SIGTERM and SIGINT to the main one."""

from __future__ import annotations

import signal
import threading

_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def leave_signals_to_the_main_thread() -> None:
    """Block SIGTERM and SIGINT in this thread and the threads it starts.

    Python runs a signal's handler in the main thread only. A signal that
    the kernel gave to another thread waited until the main thread woke on
    its own: a daemon waiting for its run to end answered a second SIGTERM
    only after half a minute. Blocked in every other thread, a signal goes
    to the main thread and ends its wait at once.
    """
    if hasattr(signal, "pthread_sigmask"):  # not on Windows
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def start_leaving_signals(thread: threading.Thread) -> None:
    """Start `thread` with SIGTERM and SIGINT blocked from its first moment.

    A thread inherits the signals its starter blocks. Started by the main
    thread, one that blocked them itself took them until it got to that,
    a moment a busy machine stretched; so the starter blocks them around
    the start.
    """
    if not hasattr(signal, "pthread_sigmask"):  # not on Windows
        thread.start()
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
