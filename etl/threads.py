"""The threads the product starts leave the stop signals to the main one."""

from __future__ import annotations

import signal
import threading

# The signals that stop a run: SIGHUP too, which a closing terminal or a
# service manager sends, and which otherwise ended a daemon mid-run without
# a word, its run left recorded as running.
STOP_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGHUP")
    if hasattr(signal, name)  # Windows has no SIGHUP
)
_SIGNALS = set(STOP_SIGNALS)


def leave_signals_to_the_main_thread() -> None:
    """Block the stop signals in this thread and the threads it starts.

    Python runs a signal's handler in the main thread only. A signal that
    the kernel gave to another thread waited until the main thread woke on
    its own: a daemon waiting for its run to end answered a second SIGTERM
    only after half a minute. Blocked in every other thread, a signal goes
    to the main thread and ends its wait at once.
    """
    if hasattr(signal, "pthread_sigmask"):  # not on Windows
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def start_leaving_signals(thread: threading.Thread) -> None:
    """Start `thread` with the stop signals blocked from its first moment.

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
