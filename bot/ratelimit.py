"""A per-user limit on questions: at most N in any sliding window of W seconds (in memory, per process)."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable


class QuestionRateLimiter:
    def __init__(self, *, max_questions: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_questions = max_questions
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._asked: dict[str, deque[float]] = {}

    def try_acquire(self, user_id: str | None) -> int:
        """0 if `user_id` may ask now (and count it); else the whole seconds until they may ask again."""
        if not user_id or self.max_questions <= 0:
            return 0
        now = self._clock()
        with self._lock:
            times = self._asked.setdefault(user_id, deque())
            while times and now - times[0] >= self.window_s:
                times.popleft()
            if len(times) >= self.max_questions:
                return max(1, math.ceil(self.window_s - (now - times[0])))
            times.append(now)
            if len(self._asked) > 10_000:  # forget idle users so memory stays bounded
                for uid in [u for u, t in self._asked.items() if not t or now - t[-1] >= self.window_s]:
                    del self._asked[uid]
            return 0
