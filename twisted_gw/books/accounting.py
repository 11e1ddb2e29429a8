"""
Per-user and total request and token counts, and rolling windows of
throughput and latency.  Time comes from an injected L{IReactorTime}.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Mapping
from typing import Optional

import attrs
from twisted.internet.interfaces import IReactorTime

from twisted_gw.books.record import RequestRecord

WINDOW_1M = 60.0
WINDOW_5M = 300.0
HISTORY = 900.0  # the dashboard's chart: 15 minutes
BUCKET = 10.0  # seconds per point of that chart
DAY = 86400.0
RECENT_PROBLEMS = 20


class _Recent:
    """
    Finished requests of the last minutes as columns of floats (time, completion
    tokens, duration, time to first token or NaN): no Python object per
    request.  Objects made one per request as a burst of clients leaves would
    be scattered over the allocator's arenas and keep every one of them from
    being given back after the burst.
    """

    def __init__(self) -> None:
        self.at = array("d")
        self.tokens = array("d")
        self.duration = array("d")
        self.ttft = array("d")
        self._first = 0  # entries before this index have expired

    def __len__(self) -> int:
        return len(self.at) - self._first

    def add(self, at: float, tokens: int, duration: float, ttft: Optional[float]) -> None:
        self.at.append(at)
        self.tokens.append(tokens)
        self.duration.append(duration)
        self.ttft.append(math.nan if ttft is None else ttft)

    def expire(self, horizon: float) -> None:
        """Forget the entries older than C{horizon}; the columns are compacted now and then."""
        at, first = self.at, self._first
        while first < len(at) and at[first] < horizon:
            first += 1
        if first > 256 and 2 * first > len(at):
            for column in (self.at, self.tokens, self.duration, self.ttft):
                del column[:first]
            first = 0
        self._first = first

    def tokens_since(self, horizon: float) -> float:
        at, tokens = self.at, self.tokens
        return sum(tokens[i] for i in range(self._first, len(at)) if at[i] >= horizon)

    def durations(self) -> list[float]:
        return self.duration[self._first:].tolist()

    def ttfts(self) -> list[float]:
        return [t for t in self.ttft[self._first:] if not math.isnan(t)]


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
        self._recent = _Recent()  # the last five minutes of finished requests
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

    def rebase(self, users: Mapping[str, UserTotals], today: Mapping[str, UserTotals]) -> None:
        """
        The per-user totals (all time and today) are these, kept elsewhere (the
        shared ledger, every replica's requests in it); requests recorded next add to them.
        """
        self.users, self.today, self.totals = {}, {}, UserTotals()
        self.restore(users)
        self.restore_today(today)

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
        if rec.generation:  # (the windows are about generations: a model list's time says nothing of them)
            self._recent.add(now, rec.completion_tokens, rec.duration, rec.ttft)
        self._expire()

    def _expire(self) -> None:
        self._recent.expire(self._clock.seconds() - WINDOW_5M)
        history_start = self._clock.seconds() - HISTORY
        while self._buckets and self._buckets[0][0] < history_start:
            self._buckets.popleft()

    def tokens_per_second(self, window: float) -> float:
        """Completion tokens of requests finished in the last C{window} seconds, per second."""
        self._expire()
        horizon = self._clock.seconds() - window
        return self._recent.tokens_since(horizon) / window

    def average_response_time(self) -> float:
        """Mean duration of the generations (POSTs) finished in the last five minutes (0 when none)."""
        self._expire()
        durations = self._recent.durations()
        return sum(durations) / len(durations) if durations else 0.0

    def percentiles(self) -> dict[str, Optional[float]]:
        """p50 and p95 of duration and time to first token of the generations finished in the last five minutes."""
        self._expire()
        durations = sorted(self._recent.durations())
        ttfts = sorted(self._recent.ttfts())
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
