"""
Per-user and total request and token counts, and rolling windows of
throughput and latency.  Time comes from an injected L{IReactorTime}.
"""

from __future__ import annotations

from collections import deque

import attrs
from twisted.internet.interfaces import IReactorTime

WINDOW_1M = 60.0
WINDOW_5M = 300.0


@attrs.frozen
class RequestRecord:
    """What one finished request cost."""

    user: str
    method: str
    path: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    duration: float
    queue_wait: float = 0.0
    cancelled: bool = False
    usage_source: str = "none"


@attrs.define
class UserTotals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cancelled: int = 0


class Accounting:
    """Running totals, per user, plus the last five minutes of finished requests."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.totals = UserTotals()
        self.users: dict[str, UserTotals] = {}
        # (finished at, completion tokens, duration), oldest first
        self._recent: deque[tuple[float, int, float]] = deque()

    def record(self, rec: RequestRecord) -> None:
        user = self.users.setdefault(rec.user, UserTotals())
        for totals in (self.totals, user):
            totals.requests += 1
            totals.prompt_tokens += rec.prompt_tokens
            totals.completion_tokens += rec.completion_tokens
            totals.cancelled += rec.cancelled
        self._recent.append((self._clock.seconds(), rec.completion_tokens, rec.duration))
        self._expire()

    def _expire(self) -> None:
        horizon = self._clock.seconds() - WINDOW_5M
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()

    def tokens_per_second(self, window: float) -> float:
        """Completion tokens of requests finished in the last C{window} seconds, per second."""
        self._expire()
        horizon = self._clock.seconds() - window
        return sum(tokens for at, tokens, _ in self._recent if at >= horizon) / window

    def average_response_time(self) -> float:
        """Mean duration of the requests finished in the last five minutes (0 when none)."""
        self._expire()
        if not self._recent:
            return 0.0
        return sum(duration for _, _, duration in self._recent) / len(self._recent)
