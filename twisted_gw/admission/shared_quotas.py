"""
Token quotas shared by a cluster: every replica charges the store, and reads
a user's use back from it before checking a generation, so the limits and
the C{x-ratelimit-*} headers are the cluster's.  The windows' logic is
L{Quotas}'; this adds the store.  While the store is away, a replica goes on
from the counts it last read plus its own charges, and when it is back it
hands over those charges (today's total raised first to what it last knew,
in case the store came back empty).
"""

from __future__ import annotations

import itertools
from collections import deque

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from twisted_gw.admission import lua
from twisted_gw.admission.quota import MINUTE, Quotas
from twisted_gw.admission.store import Store, StoreDown, store_down


class SharedQuotas(Quotas):
    def __init__(self, clock: IReactorTime, store: Store) -> None:
        super().__init__(clock)
        self.store = store
        self._numbers = itertools.count()
        self._known: dict[str, tuple[int, int]] = {}  # user -> (day, today's total as last read from the store)
        self._unsent: list[tuple[str, float, str, int, int]] = []  # (user, time, member, tokens, day)

    def refresh(self, user: str) -> Deferred[None]:
        """Read C{user}'s use from the store (the last counts stay when it does not answer)."""
        now, today = self.clock.seconds(), self._today()
        d = self.store.run(lua.USE, user, repr(now), today)

        def read(reply: list[object]) -> None:
            minute, total = reply
            assert isinstance(minute, list)
            pairs = [(float(minute[i + 1]), int(str(minute[i]).rsplit(":", 1)[1])) for i in range(0, len(minute), 2)]
            self._minute[user] = deque(sorted(pairs))
            self._day[user] = self._known[user] = (today, int(str(total)))

        return d.addCallbacks(read, store_down)

    def used(self, user: str, tokens: int) -> None:
        if not tokens:
            return
        super().used(user, tokens)
        charge = (user, self.clock.seconds(), f"{self.store.replica}.{next(self._numbers)}", tokens, self._today())

        def unsent(failure: Failure) -> None:
            failure.trap(StoreDown)
            self._unsent.append(charge)

        self._send(charge, True).addErrback(unsent)

    def _send(self, charge: tuple[str, float, str, int, int], count_day: bool) -> Deferred[object]:
        user, at, member, tokens, day = charge
        return self.store.run(lua.CHARGE, user, repr(at), member, tokens, day, int(count_day))

    def store_back(self) -> None:
        """Hand over the charges made while the store was away."""
        unsent, self._unsent = self._unsent, []
        today = self._today()
        missed: dict[str, int] = {}
        for charge in unsent:
            user, at, _, tokens, day = charge
            if at > self.clock.seconds() - MINUTE:
                self._send(charge, False).addErrback(store_down)
            if day == today:
                missed[user] = missed.get(user, 0) + tokens
        for user, tokens in missed.items():
            day, known = self._known.get(user, (today, 0))
            self.store.run(lua.RESTORE_DAY, user, today, known if day == today else 0,
                           tokens).addErrback(store_down)
