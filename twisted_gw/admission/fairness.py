"""
The fair queue's order, as pure logic: start-time fair queuing across users.

Each request gets a virtual start tag when it arrives: the later of the
current virtual time and the finish tag of its user's previous request; its
finish tag is the start plus C{1 / weight}.  Requests run in order of start
tag (ties: arrival).  So a user with twenty queued requests and a user who just
arrived alternate; with weights 2 and 1, both saturating, the first runs twice
as often.  Within one user the order is FIFO.  Because the order is a sort by
tags fixed at arrival, a waiter's position is its rank in that order, and it
only changes when somebody ahead of it leaves or a newcomer is placed ahead.
"""

from __future__ import annotations

import bisect
import itertools
import sys
from collections.abc import Callable, Iterator

import attrs


@attrs.define(eq=False)
class Entry:
    """One waiting request."""

    user: str
    start: float
    seq: int

    @property
    def key(self) -> tuple[float, int]:
        return (self.start, self.seq)


@attrs.define
class FairScheduler:
    """Waiting requests per user, handed out by start-time fair queuing."""

    _waiting: list[Entry] = attrs.Factory(list)  # kept sorted by key
    _finish: dict[str, float] = attrs.Factory(dict)
    _virtual: float = 0.0
    _seq: Iterator[int] = attrs.Factory(itertools.count)
    _changed: int = sys.maxsize  # the first index whose entry moved since L{take_changed}
    _count: dict[str, int] = attrs.Factory(dict)  # waiting requests per user

    def __len__(self) -> int:
        return len(self._waiting)

    def _start(self, user: str, weight: float) -> float:
        """The start a request of C{user} gets if it arrives now; its user's next start moves past it."""
        start = max(self._virtual, self._finish.get(user, 0.0))
        self._finish[user] = start + 1.0 / weight
        return start

    def tag(self, user: str, weight: float) -> Entry:
        """Tags for a request of C{user}: the start it would get if it arrived now."""
        return Entry(user, self._start(user, weight), next(self._seq))

    def admit_now(self, user: str, weight: float) -> None:
        """A request that runs without waiting still uses its user's share (no entry is made for it)."""
        self._virtual = self._start(user, weight)

    def enqueue(self, user: str, weight: float) -> Entry:
        return self._insert(self.tag(user, weight))

    def enqueue_first(self, user: str) -> Entry:
        """A request put back at the head (it ran already, and its upstream failed); it costs no share again."""
        return self._insert(Entry(user, float("-inf"), next(self._seq)))

    def _insert(self, entry: Entry) -> Entry:
        index = bisect.bisect_right(self._waiting, entry.key, key=_key)
        self._waiting.insert(index, entry)
        self._changed = min(self._changed, index)
        self._count[entry.user] = self._count.get(entry.user, 0) + 1
        return entry

    def _delete(self, index: int) -> None:
        user = self._waiting.pop(index).user
        self._changed = min(self._changed, index)
        self._count[user] -= 1
        if not self._count[user]:
            del self._count[user]

    def take_changed(self) -> int:
        """The first index whose entry is new or moved since the last call (len() when none)."""
        changed, self._changed = min(self._changed, len(self._waiting)), sys.maxsize
        return changed

    def remove(self, entry: Entry) -> None:
        """A waiter left (cancelled, timed out); its share is given back if it was its user's last."""
        self._delete(self._waiting.index(entry))
        if self._finish.get(entry.user) is not None and not self.waiting_of(entry.user):
            self._finish[entry.user] = max(self._virtual, entry.start)

    def pop_next(self, can_run: Callable[[Entry], bool] = lambda entry: True) -> Entry | None:
        """The next request to run, skipping those that may not run now (user at its cap, no upstream)."""
        for index, entry in enumerate(self._waiting):
            if can_run(entry):
                self._delete(index)
                self._virtual = max(self._virtual, entry.start)
                return entry
        return None

    def waiting_of(self, user: str) -> int:
        return self._count.get(user, 0)

    def order(self, start: int = 0) -> list[Entry]:
        """The waiters in the order they will run (barring per-user limits), from index C{start}."""
        return self._waiting[start:]

    def users_waiting(self) -> list[str]:
        return [e.user for e in self._waiting]


def _key(entry: Entry) -> tuple[float, int]:
    return entry.key
