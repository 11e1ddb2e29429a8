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

    @property
    def places(self) -> int:
        return self.slots or self.discovered or 1

    @property
    def routable(self) -> bool:
        """Checked healthy, or not checked yet (health checks may be off)."""
        return self.state in (OK, UNKNOWN)

    @property
    def free(self) -> int:
        return max(0, self.places - self.active) if self.routable else 0

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
        }


@attrs.define
class Router:
    """The upstreams and the choice between them."""

    routes: Sequence[Route]
    _turn: int = 0  # where the round-robin goes on

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
        serving = [r for r in self.routes if model is not None and model in r.models]
        pool = serving or list(self.routes)
        skip = set(exclude)
        return [r for r in pool if r.routable and r not in skip]

    def best(self, model: Optional[str] = None, exclude: Iterable[Route] = ()) -> Optional[Route]:
        """The candidate with the most free places (ties: the next in turn), or None if none is free."""
        if len(self.routes) == 1 and not exclude:  # (the usual single upstream: no ranking)
            only = self.routes[0]
            return only if only.free > 0 else None
        return self._rotate([r for r in self.candidates(model, exclude) if r.free > 0], lambda r: -r.free)

    def choose(self, model: Optional[str] = None, exclude: Iterable[Route] = ()) -> Optional[Route]:
        """L{best}, and the turn moves past it."""
        return self.take_turn(self.best(model, exclude))

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
