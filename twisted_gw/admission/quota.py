"""
Per-user token quotas: C{tokens_per_minute} (a sliding minute) and
C{tokens_per_day} (the UTC calendar day), counting prompt and completion
tokens of finished requests.  Pure logic with an injected clock; the day's
usage so far is given back from the ledger at startup.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Optional

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from twisted_gw.admission.settings import UserSettings

MINUTE = 60.0
DAY = 86400.0


@attrs.frozen
class Window:
    """One quota's state for one user."""

    name: str  # "tokens_per_minute" or "tokens_per_day"
    limit: int
    used: int
    reset: float  # seconds until the window is back to its full limit
    retry_after: float  # seconds until some of it is free again (0 when some is free now)

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


def duration_text(seconds: float) -> str:
    """OpenAI's reset notation: C{"1m30s"}, C{"12s"}, C{"250ms"}."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes or hours else "")
    return text + f"{secs}s"


class Quotas:
    """Token use per user in the last minute and today."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._minute: dict[str, deque[tuple[float, int]]] = {}
        self._day: dict[str, tuple[int, int]] = {}  # user -> (day number, tokens)

    def _today(self) -> int:
        return int(self.clock.seconds() // DAY)

    def day_start(self) -> float:
        """When today (UTC) began, in the clock's seconds."""
        return self._today() * DAY

    def restore_today(self, used: Mapping[str, int]) -> None:
        """Today's tokens per user, from the ledger."""
        today = self._today()
        for user, tokens in used.items():
            self._day[user] = (today, tokens)

    def refresh(self, user: str) -> Deferred[None]:
        """C{user}'s use read again where it is kept (here: nothing to read; see L{SharedQuotas})."""
        return succeed(None)

    def used(self, user: str, tokens: int) -> None:
        """C{user} has just used C{tokens}."""
        if not tokens:
            return
        now = self.clock.seconds()
        self._minute.setdefault(user, deque()).append((now, tokens))
        day, used = self._day.get(user, (self._today(), 0))
        self._day[user] = (self._today(), (used if day == self._today() else 0) + tokens)

    def windows(self, user: str, settings: UserSettings) -> list[Window]:
        now = self.clock.seconds()
        result = []
        if settings.tokens_per_minute is not None:
            entries = self._minute.get(user, deque())
            while entries and entries[0][0] <= now - MINUTE:
                entries.popleft()
            used = sum(tokens for _, tokens in entries)
            reset = entries[-1][0] + MINUTE - now if entries else 0.0
            retry, over = 0.0, used - settings.tokens_per_minute
            for at, tokens in entries:
                if over < 0:
                    break
                over -= tokens
                retry = at + MINUTE - now
            result.append(Window("tokens_per_minute", settings.tokens_per_minute, used, reset, retry))
        if settings.tokens_per_day is not None:
            day, used = self._day.get(user, (self._today(), 0))
            used = used if day == self._today() else 0
            until_midnight = (self._today() + 1) * DAY - now
            retry = until_midnight if used >= settings.tokens_per_day else 0.0
            result.append(Window("tokens_per_day", settings.tokens_per_day, used,
                                 until_midnight if used else 0.0, retry))
        return result

    def exceeded(self, user: str, settings: UserSettings) -> Optional[Window]:
        """The window that is used up (the one free again last), if any."""
        spent = [w for w in self.windows(user, settings) if w.remaining <= 0]
        return max(spent, key=lambda w: w.retry_after) if spent else None

    def headers(self, user: str, settings: UserSettings) -> dict[bytes, bytes]:
        """OpenAI's x-ratelimit-*-tokens headers for the tightest window (none without a quota)."""
        windows = self.windows(user, settings)
        if not windows:
            return {}
        tightest = min(windows, key=lambda w: (w.remaining, -w.reset))
        return {
            b"x-ratelimit-limit-tokens": str(tightest.limit).encode(),
            b"x-ratelimit-remaining-tokens": str(tightest.remaining).encode(),
            b"x-ratelimit-reset-tokens": duration_text(tightest.reset).encode(),
        }
