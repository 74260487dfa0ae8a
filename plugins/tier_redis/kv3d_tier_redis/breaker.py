"""Failures of the store degrade to misses, then the store is tried again by itself.

After a command fails for the store (connection refused or lost, a timeout, an
authentication or server error), the tier stops asking it for a while:
``get`` is a miss and ``put`` a dropped write at once, without touching the
network. The pause starts at ``backoff_s`` and doubles up to ``backoff_max_s``
while failures go on; the first call after it tries the store again (the client
reconnects on its own), and the first success resets it. So an outage costs a
request at most the timeouts of one get (two commands: ``connect_timeout_s`` plus
``timeout_s`` each), and the tier comes back without a restart.
"""

from __future__ import annotations

import threading
import time


class Breaker:
    def __init__(self, backoff_s: float, backoff_max_s: float) -> None:
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._lock = threading.Lock()
        self._delay = 0.0
        self._until = 0.0
        self.last_error = ""

    def blocked(self) -> bool:
        """True while the store is not to be asked (a recent failure)."""
        with self._lock:
            return time.monotonic() < self._until

    @property
    def failing(self) -> bool:
        """True from a failure until the next success."""
        with self._lock:
            return self._delay > 0

    def failed(self, error: str) -> None:
        with self._lock:
            self._delay = min(self.backoff_max_s, self._delay * 2 if self._delay else self.backoff_s)
            self._until = time.monotonic() + self._delay
            self.last_error = error

    def succeeded(self) -> None:
        with self._lock:
            self._delay = 0.0
            self._until = 0.0
