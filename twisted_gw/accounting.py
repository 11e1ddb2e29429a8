"""
Per-user and total request and token counts, and rolling windows of
throughput and latency.  Time comes from an injected L{IReactorTime}.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Optional

import attrs
from twisted.internet.interfaces import IReactorTime

WINDOW_1M = 60.0
WINDOW_5M = 300.0
HISTORY = 900.0  # the dashboard's chart: 15 minutes
BUCKET = 10.0  # seconds per point of that chart
DAY = 86400.0
RECENT_PROBLEMS = 20


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
    model: Optional[str] = None
    ttft: Optional[float] = None
    tokens_per_second: Optional[float] = None
    error: Optional[str] = None


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
        # (finished at, completion tokens, duration, time to first token), oldest first
        self._recent: deque[tuple[float, int, float, Optional[float]]] = deque()
        self._buckets: deque[list[float]] = deque()  # [bucket start, completion tokens]
        self.today: dict[str, UserTotals] = {}
        self._today_number = int(clock.seconds() // DAY)
        self.problems: deque[dict[str, object]] = deque(maxlen=RECENT_PROBLEMS)

    def restore(self, users: Mapping[str, UserTotals]) -> None:
        """Start from totals kept elsewhere (the ledger), as if those requests had been recorded."""
        for name, saved in users.items():
            user = self.users.setdefault(name, UserTotals())
            for totals in (self.totals, user):
                totals.requests += saved.requests
                totals.prompt_tokens += saved.prompt_tokens
                totals.completion_tokens += saved.completion_tokens
                totals.cancelled += saved.cancelled

    def restore_today(self, users: Mapping[str, UserTotals]) -> None:
        """Today's (UTC) per-user totals, from the ledger."""
        self._roll_day()
        for name, saved in users.items():
            self.today[name] = attrs.evolve(saved)

    def _roll_day(self) -> None:
        today = int(self._clock.seconds() // DAY)
        if today != self._today_number:
            self._today_number = today
            self.today = {}

    def history(self) -> list[tuple[float, float]]:
        """Generated tokens per second in 10-second steps over the last 15 minutes: (step start, rate)."""
        self._expire()
        return [(start, tokens / BUCKET) for start, tokens in self._buckets]

    def record(self, rec: RequestRecord) -> None:
        now = self._clock.seconds()
        self._roll_day()
        start = now - now % BUCKET
        if self._buckets and self._buckets[-1][0] == start:
            self._buckets[-1][1] += rec.completion_tokens
        else:
            self._buckets.append([start, float(rec.completion_tokens)])
        if rec.cancelled or rec.error or rec.status >= 500:
            self.problems.appendleft({
                "at": round(now, 3), "user": rec.user, "path": rec.path, "status": rec.status,
                "error": rec.error, "cancelled": rec.cancelled,
            })
        user = self.users.setdefault(rec.user, UserTotals())
        today = self.today.setdefault(rec.user, UserTotals())
        for totals in (self.totals, user, today):
            totals.requests += 1
            totals.prompt_tokens += rec.prompt_tokens
            totals.completion_tokens += rec.completion_tokens
            totals.cancelled += rec.cancelled
        self._recent.append((self._clock.seconds(), rec.completion_tokens, rec.duration, rec.ttft))
        self._expire()

    def _expire(self) -> None:
        horizon = self._clock.seconds() - WINDOW_5M
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()
        history_start = self._clock.seconds() - HISTORY
        while self._buckets and self._buckets[0][0] < history_start:
            self._buckets.popleft()

    def tokens_per_second(self, window: float) -> float:
        """Completion tokens of requests finished in the last C{window} seconds, per second."""
        self._expire()
        horizon = self._clock.seconds() - window
        return sum(tokens for at, tokens, _, _ in self._recent if at >= horizon) / window

    def average_response_time(self) -> float:
        """Mean duration of the requests finished in the last five minutes (0 when none)."""
        self._expire()
        if not self._recent:
            return 0.0
        return sum(duration for _, _, duration, _ in self._recent) / len(self._recent)

    def percentiles(self) -> dict[str, Optional[float]]:
        """p50 and p95 of request duration and time to first token, over the last five minutes."""
        self._expire()
        durations = sorted(d for _, _, d, _ in self._recent)
        ttfts = sorted(t for _, _, _, t in self._recent if t is not None)
        return {
            "p50_response_time_s": _percentile(durations, 0.50),
            "p95_response_time_s": _percentile(durations, 0.95),
            "p50_ttft_s": _percentile(ttfts, 0.50),
            "p95_ttft_s": _percentile(ttfts, 0.95),
        }


def _percentile(ordered: list[float], q: float) -> Optional[float]:
    """Nearest-rank percentile of an ordered list; None when it is empty."""
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 4)
