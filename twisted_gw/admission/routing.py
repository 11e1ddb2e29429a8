"""
Which upstream a request goes to, as pure logic.

Each upstream is a L{Route}: its places (a configured count, or llama.cpp's
C{total_slots} once read, else 1), the requests it runs, its health and the
models it serves.  The L{Router} hands a request the routable upstream with
the most free places among those that serve its model (ties: round-robin),
so work spreads the way paddler spreads it.  Health and models are written
here from the checks of L{twisted_gw.upstream.health}; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

import attrs

from twisted_gw.admission.prefix import PrefixIndex

# What a route's health check last saw.
UNKNOWN, OK, LOADING, DOWN = "unknown", "ok", "loading", "down"


@attrs.define(eq=False)
class Route:
    """One upstream as the router sees it."""

    name: str  # the upstream's base URL
    slots: Optional[int] = None  # configured (#slots=N, or --max-concurrent)
    discovered: Optional[int] = None  # llama.cpp's total_slots, once read
    state: str = UNKNOWN
    models: frozenset[str] = frozenset()  # empty: not known
    active: int = 0
    failovers: int = 0  # requests it could not take that went to another upstream
    prompt_tokens: int = 0  # of the generations it answered with timings or usage...
    cached_tokens: int = 0  # ...and how many of those it had in its cache (llama.cpp's timings.cache_n)
    share: Optional[int] = None  # while a cluster's store is away: the most places this replica may hold

    @property
    def places(self) -> int:
        return self.slots or self.discovered or 1

    @property
    def routable(self) -> bool:
        """Checked healthy, or not checked yet (health checks may be off)."""
        return self.state in (OK, UNKNOWN)

    @property
    def free(self) -> int:
        if not self.routable:
            return 0
        limit = self.places if self.share is None else min(self.places, self.share)
        return max(0, limit - self.active)

    def update(self, state: str, slots: Optional[int] = None, models: Optional[frozenset[str]] = None,
               read_props: bool = False) -> None:
        """
        What a health check found: its state; when it read them, the slots
        llama.cpp reports (C{read_props}; None: not llama.cpp) and the models.
        """
        self.state = state
        if read_props:
            self.discovered = slots
        if models is not None:
            self.models = models

    @property
    def needs_props(self) -> bool:
        """Whether the next check should read llama.cpp's slots: it is not known to be up with them read."""
        return self.state != OK or self.discovered is None

    def describe(self) -> dict[str, Any]:
        """Its line in C{/metrics}."""
        return {
            "url": self.name,
            "state": self.state,
            "healthy": self.routable,
            "active": self.active,
            "places": self.places,
            "places_from": "configured" if self.slots else "props" if self.discovered else "default",
            "models": sorted(self.models),
            "failovers": self.failovers,
            "cache_hit_rate": round(self.cached_tokens / self.prompt_tokens, 4) if self.prompt_tokens else None,
        }

    @property
    def load(self) -> float:
        return self.active / self.places


# Why a generation went where it went (llmgw_routing_decisions_total's reasons).
CACHE, BALANCE, LEAST_BUSY = "cache", "balance", "least_busy"
SHARE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
NOWHERE = "-"  # no upstream's name: a generation every upstream failed waits out its time


@attrs.define
class Decision:
    route: Route
    reason: str
    share: float  # of the prompt the chosen upstream was found to hold


@attrs.define
class Router:
    """
    The upstreams and the choice between them.  With an C{index}
    (cache-aware routing), a generation whose prompt one upstream holds a
    prefix of (at least C{min_match} of its blocks) goes there, unless that
    upstream is out of balance: no free place while another has one, or its
    share of busy places more than C{balance_gap} above the least busy one's.
    Otherwise (and with no index) the most free places win, ties in turn.
    """

    routes: Sequence[Route]
    _turn: int = 0  # where the round-robin goes on
    index: Optional[PrefixIndex] = None
    min_match: float = 0.3
    balance_gap: float = 0.5
    decisions: dict[tuple[str, str], int] = attrs.Factory(dict)  # (upstream, reason) -> generations
    shares: list[int] = attrs.Factory(lambda: [0] * len(SHARE_BUCKETS))  # cumulative counts per bucket
    shares_sum: float = 0.0

    @property
    def cache_aware(self) -> bool:
        return self.index is not None and len(self.routes) > 1

    @classmethod
    def single(cls, places: int) -> Router:
        """One upstream with C{places} places (the admission queue's unit tests use this)."""
        return cls([Route("upstream", slots=places)])

    @property
    def places(self) -> int:
        """The concurrency total: the places of the routable upstreams."""
        return sum(r.places for r in self.routes if r.routable)

    @property
    def active(self) -> int:
        return sum(r.active for r in self.routes)

    @property
    def free(self) -> int:
        return sum(r.free for r in self.routes)

    def candidates(self, model: Optional[str], exclude: Iterable[Route] = ()) -> list[Route]:
        """
        The routable upstreams a request for C{model} may go to: those listing
        the model when any upstream lists it, else all; never C{exclude}.
        """
        return [r for r in self._pool(model, exclude) if r.routable]

    def _pool(self, model: Optional[str], exclude: Iterable[Route]) -> list[Route]:
        """The upstreams listing C{model} when any lists it, else all; never C{exclude}; whatever their health."""
        serving = [r for r in self.routes if model is not None and model in r.models]
        skip = set(exclude)
        return [r for r in serving or self.routes if r not in skip]

    def best(self, model: Optional[str] = None, exclude: Iterable[Route] = ()) -> Optional[Route]:
        """The candidate with the most free places (ties: the next in turn), or None if none is free."""
        if len(self.routes) == 1 and not exclude:  # (the usual single upstream: no ranking)
            only = self.routes[0]
            return only if only.free > 0 else None
        return self._rotate([r for r in self.candidates(model, exclude) if r.free > 0], lambda r: -r.free)

    def decide(self, model: Optional[str] = None, exclude: Iterable[Route] = (),
               prompt: Sequence[int] = ()) -> Optional[Decision]:
        """Where a generation (of C{prompt}'s block hashes) would go now, and why; None when no place is free."""
        least = self.best(model, exclude)
        if least is None:
            return None
        if self.index is None or not prompt or len(self.routes) == 1:
            return Decision(least, LEAST_BUSY, 0.0)
        candidates = self.candidates(model, exclude)
        holders, share = self._holders(candidates, prompt)
        if not holders:
            return Decision(least, LEAST_BUSY, share)
        pick = self._rotate(holders, lambda r: -r.free)
        assert pick is not None
        if pick.free == 0 or pick.load - min(r.load for r in candidates) > self.balance_gap:
            return Decision(least, BALANCE, share)
        return Decision(pick, CACHE, share)

    def _holders(self, candidates: Sequence[Route], prompt: Sequence[int]) -> tuple[list[Route], float]:
        """
        The C{candidates} holding the longest prefix of C{prompt}, if it
        covers at least C{min_match} of it (else none), and the share it covers.
        """
        assert self.index is not None
        scored = [(self.index.match(r, prompt), r) for r in candidates]
        top = max((n for n, _ in scored), default=0)
        share = top / len(prompt)
        if top == 0 or share < self.min_match:
            return [], share
        return [r for n, r in scored if n == top], share

    def holder(self, model: Optional[str], exclude: Iterable[Route], prompt: Sequence[int]) -> tuple[str, float]:
        """
        The upstream holding the longest prefix of C{prompt} (at least
        C{min_match} of it), and the share it holds: where a cluster's store
        sends the generation when it is not out of balance ("" when none).
        """
        if not self.cache_aware or not prompt:
            return "", 0.0
        holders, share = self._holders(self.candidates(model, exclude), prompt)
        return (holders[0].name if holders else ""), share

    def servers(self, model: Optional[str], exclude: Iterable[Route] = ()) -> list[str]:
        """
        The upstreams a generation for C{model} may go to, whatever their
        health (a cluster's store knows which have places): empty for all.
        """
        pool = self._pool(model, exclude)
        if not pool:
            return [NOWHERE]
        return [] if len(pool) == len(self.routes) else [r.name for r in pool]

    def record(self, decision: Decision, prompt: Sequence[int] = ()) -> None:
        """C{decision} was taken: counted, the turn moves past its upstream, which now holds C{prompt}."""
        route = decision.route
        key = (route.name, decision.reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        if self.index is not None and prompt:
            for i, bound in enumerate(SHARE_BUCKETS):
                if decision.share <= bound:
                    self.shares[i] += 1
            self.shares_sum += decision.share
            self.index.insert(route, prompt)
        self.take_turn(route)

    def choose(self, model: Optional[str] = None, exclude: Iterable[Route] = (),
               prompt: Sequence[int] = ()) -> Optional[Route]:
        """L{decide}, and the decision taken."""
        decision = self.decide(model, exclude, prompt)
        if decision is None:
            return None
        self.record(decision, prompt)
        return decision.route

    def restarted(self, route: Route) -> None:
        """C{route}'s server came back (its cache is empty): forget what it was sent."""
        if self.index is not None:
            self.index.forget(route)

    def routing_document(self) -> dict[str, Any]:
        """The C{routing} section of C{/metrics}: decisions by reason, and by upstream and reason."""
        by_reason = {reason: 0 for reason in (CACHE, BALANCE, LEAST_BUSY)}
        by_upstream: dict[str, dict[str, int]] = {}
        for (name, reason), n in sorted(self.decisions.items()):
            by_reason[reason] += n
            by_upstream.setdefault(name, {})[reason] = n
        return {"mode": "cache-aware" if self.index is not None else "least-busy", "decisions": by_reason,
                "by_upstream": by_upstream}

    def take_turn(self, route: Optional[Route]) -> Optional[Route]:
        """C{route} was chosen: the round-robin goes on after it."""
        if route is not None:
            self._turn = self.routes.index(route) + 1
        return route

    def any(self, model: Optional[str] = None, exclude: Iterable[Route] = ()) -> Optional[Route]:
        """
        An upstream for a request that takes no place (a GET): the next
        candidate in turn; when none is routable, the next of all of them
        (a check may be out of date, and the attempt will tell).
        """
        skip = set(exclude)
        pool = self.candidates(model, skip) or [r for r in self.routes if r not in skip]
        return self.take_turn(self._rotate(pool, lambda r: 0))

    def _rotate(self, pool: list[Route], rank: Any) -> Optional[Route]:
        if len(pool) <= 1:
            return pool[0] if pool else None
        n = len(self.routes)
        return min(pool, key=lambda r: (rank(r), (self.routes.index(r) - self._turn) % n))
