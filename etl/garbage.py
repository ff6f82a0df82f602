"""Python's garbage collector while runs go on.

The collector looks for reference cycles among the newest objects after
every 700 containers made, and a page decodes into thousands of dicts that
live until the page is stored. Each look found them alive and moved them
to an older generation, and the older generations' looks then walked every
object of the process, SQLAlchemy's and the pages in flight alike. In a
re-sync of 100,000 tasks that was about a twentieth of the time, as much
as with no collector at all. A look after every 20,000 keeps most pages
out of it; cycles are still collected, only later.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

YOUNG_LOOK_EVERY = 20_000


class _Collector:
    """The thresholds while any run goes on: the first run to begin sets
    them, the last to end puts back those it found."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs = 0
        self._found = gc.get_threshold()

    @contextmanager
    def looking_less_often(self) -> Iterator[None]:
        with self._lock:
            if self._runs == 0:
                self._found = gc.get_threshold()
                youngest, middle, oldest = self._found
                # A threshold of 0 turns looking off: left so.
                if youngest != 0:
                    rarer = max(YOUNG_LOOK_EVERY, youngest)
                    gc.set_threshold(rarer, middle, oldest)
            self._runs += 1
        try:
            yield
        finally:
            with self._lock:
                self._runs -= 1
                if self._runs == 0:
                    gc.set_threshold(*self._found)


_COLLECTOR = _Collector()


def looking_less_often() -> AbstractContextManager[None]:
    """While this lasts, the collector looks at its newest objects after
    every `YOUNG_LOOK_EVERY` containers made, or as it was set if rarer."""
    return _COLLECTOR.looking_less_often()
