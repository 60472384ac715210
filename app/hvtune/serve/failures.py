"""Failed requests of the run page, logged so that no client can bury the training log in them."""

from __future__ import annotations

import math
import sys
import threading
import time

FAILURES_PER_MINUTE = 20


class FailureLog:
    """Failed requests, one line each on stderr (the training log), at most FAILURES_PER_MINUTE a minute: a client
    that fails on purpose cannot bury the log; the next line logged says how many were left out."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start, self._logged, self._dropped = -math.inf, 0, 0

    def note(self, client: str, what: str) -> None:
        with self._lock:
            now = self._clock()
            if now - self._window_start >= 60:
                self._window_start, self._logged = now, 0
            if self._logged >= FAILURES_PER_MINUTE:
                self._dropped += 1
                return
            self._logged += 1
            dropped, self._dropped = self._dropped, 0
        printable = "".join(c if c.isprintable() else "?" for c in what)[:200]
        more = f" ({dropped} more failed requests not logged)" if dropped else ""
        print(f"page: {client} {printable}{more}", file=sys.stderr, flush=True)
