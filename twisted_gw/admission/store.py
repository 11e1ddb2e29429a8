"""
The shared state store of a cluster of gateways: a Redis server, reached
through txredisapi on the reactor.  This module is the I/O edge only: it runs
the scripts of L{twisted_gw.admission.lua}, renews this replica's leases about
every second, waits for the places handed to its waiters (a blocking pop on
a second connection), and tells its L{Member} when the store is lost and when
it is back.  What the answers mean is the member's business
(L{twisted_gw.admission.shared}).
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Optional, Protocol
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_gw.admission import lua

log = Logger(namespace="llmgw.state")

BEAT_INTERVAL = 1.0  # seconds between lease renewals
REPLY_TIMEOUT = 2.0  # seconds a step may take before the store counts as lost


class StoreDown(Exception):
    """The store did not answer (or is known to be away): act on what this replica knows."""


def store_down(failure: Failure) -> None:
    """An errback for a step that may find the store away: the replica then goes on alone; anything else is raised."""
    failure.trap(StoreDown)


@attrs.frozen
class StoreURL:
    host: str
    port: int
    db: int
    username: Optional[str]
    password: Optional[str]
    tls: bool

    @classmethod
    def parse(cls, url: str) -> StoreURL:
        """C{redis://[user:password@]host:port/db} or C{rediss://...} (TLS); ValueError when it is not one."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(f"not a redis:// or rediss:// URL: {url!r}")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in {url!r} is not a number")
        return cls(parts.hostname, parts.port or 6379, int(path or 0),
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None, parts.scheme == "rediss")


@attrs.frozen
class Answer:
    """What the store says after each step: the step's status, the cluster's queue, this replica's grants."""

    status: str  # "ok", "unknown" (this replica is not registered), "full", "user_full"
    waiting: int
    active: int
    replicas: int
    grants: list[tuple[str, str]]  # (lease, upstream)

    @classmethod
    def read(cls, reply: Sequence[Any]) -> Answer:
        status, waiting, active, replicas, grants = reply
        pairs = [tuple(g.split("\t", 1)) for g in grants or ()]
        return cls(status, int(waiting), int(active), int(replicas), pairs)


class Store(Protocol):
    """What the shared queue and quotas need of a store (L{RedisStore}; in tests, L{twisted_gw.testing.FakeStore})."""

    replica: str
    cluster: str
    where: str
    lease_timeout: float
    balance_gap: float
    up: bool
    replicas_seen: int
    waiting: int
    active: int

    def step(self, script: str, *args: Any) -> Deferred[Answer]: ...

    def run(self, script: str, *args: Any) -> Deferred[Any]: ...

    def sync(self) -> None: ...


class Member(Protocol):
    """What the store tells (the replica's shared admission)."""

    def answered(self, answer: Answer) -> None: ...

    def store_lost(self) -> None: ...

    def sync_state(self) -> tuple[list[list[Any]], list[list[Any]], dict[str, int]]: ...

    def store_back(self) -> None: ...


class RedisStore:
    """One replica's connection to the cluster's store."""

    def __init__(self, url: str, cluster: str, reactor: Any, lease_timeout: float = 10.0,
                 balance_gap: float = 0.5, replica: Optional[str] = None) -> None:
        self.url = StoreURL.parse(url)
        self.prefix = f"llmgw:{{{cluster}}}:"
        self.cluster = cluster
        self.where = f"{'rediss' if self.url.tls else 'redis'}://{self.url.host}:{self.url.port}/{self.url.db}"
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.lease_timeout = lease_timeout
        # Leases are renewed at least 4 times per timeout, and a replica that missed renewals for the timeout less
        # one interval is reaped at the next renewal of another: its places are back within the lease timeout.
        self.beat_interval = min(BEAT_INTERVAL, lease_timeout / 4)
        self.reap_after = lease_timeout - self.beat_interval
        self.balance_gap = balance_gap
        self.replica = replica or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.member: Optional[Member] = None
        self.tls: Any = None  # how a rediss:// store is verified (an IOpenSSLClientConnectionCreator; else the
        # system's CAs: optionsForClientTLS)
        self.rejoined: list[Callable[[], None]] = []  # called when the store is back (the quotas' charges)
        self.up = False
        self.replicas_seen = 1
        self.waiting = 0  # the cluster's queue, as of the last answer
        self.active = 0
        self._connection: Any = None
        self._factories: list[Any] = []
        self._blocking: Any = None
        self._beat: Optional[LoopingCall] = None
        self._next_pop: Optional[IDelayedCall] = None
        self._syncing = False
        self._stopped = False
        self._ever_up = False
        self._said_unreachable = False
        self._refusal = ""

    def _connect(self) -> Any:
        """A connection that comes back by itself: tried again within a beat's time once the store is back."""
        import txredisapi

        u = self.url
        factory = txredisapi.RedisFactory(f"{u.host}:{u.port}", u.db or None, 1, isLazy=True, password=u.password,
                                          replyTimeout=self.lease_timeout, convertNumbers=False,
                                          username=u.username)
        factory.initialDelay, factory.maxDelay = 0.1, BEAT_INTERVAL
        endpoint: Any = HostnameEndpoint(self.reactor, u.host, u.port, timeout=REPLY_TIMEOUT)
        if u.tls:
            endpoint = wrapClientTLS(self.tls or optionsForClientTLS(u.host), endpoint)
        # (a connection refused at AUTH or SELECT fails this Deferred, which nothing else waits on: its reason is
        # said once, and the next beat makes new connections)
        factory.deferred.addErrback(self._refused)
        factory.startConnecting(endpoint)
        self._factories.append(factory)
        return factory.handler

    def _refused(self, failure: Failure) -> None:
        why = failure.getErrorMessage()
        if why != self._refusal:
            self._refusal = why
            log.error("state store {host}:{port}: {why}", host=self.url.host, port=self.url.port, why=why)

    def start(self, member: Member) -> None:
        """Connect, register, renew the leases every second and take the grants as they come."""
        self.member = member
        self._connection = self._connect()
        self._blocking = self._connect()
        self._beat = LoopingCall(self.beat)
        self._beat.clock = self.clock
        self._beat.start(self.beat_interval, now=True)
        self._pop()

    async def stop(self) -> None:
        """Give back every place and waiter of this replica at once (the others need not wait for the lease)."""
        self._stopped = True
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        if self._next_pop is not None and self._next_pop.active():
            self._next_pop.cancel()
        if self.up:
            try:
                await self._eval(lua.LEAVE, self.replica, self.balance_gap)
            except Exception:  # (the store went meanwhile: the leases run out instead)
                log.info("state store {host}:{port} not told of this replica's stop: its leases will run out",
                         host=self.url.host, port=self.url.port)
        for factory in self._factories:
            await factory.disconnect()

    def _eval(self, script: str, *args: Any, wait: bool = False) -> Deferred[Any]:
        """
        Run C{script}; fails with L{StoreDown} at once when the connection is
        down (unless C{wait}: joining waits for it), and when no answer comes
        within REPLY_TIMEOUT (the command itself is left to end as it may).
        """
        if not wait and not self._factories[0].size:
            return fail(StoreDown("no connection"))
        result: Deferred[Any] = Deferred()
        timer = self.clock.callLater(REPLY_TIMEOUT, lambda: result.errback(StoreDown("no answer")))

        def done(outcome: Any) -> None:
            if not timer.active():
                return  # (too late: it counted as no answer)
            timer.cancel()
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        self._connection.eval(script, [], [self.prefix, *args]).addBoth(done)
        return result

    def step(self, script: str, *args: Any) -> Deferred[Answer]:
        """
        Run one of the admission steps (their ARGV after the prefix and this
        replica's name); its answer goes to the member too.  Fails with
        L{StoreDown} while the store is away (and when this call finds so).
        """
        return self.run(script, self.replica, *args).addCallback(self._answered)

    def _answered(self, reply: Sequence[Any]) -> Answer:
        answer = Answer.read(reply)
        self.waiting, self.active, self.replicas_seen = answer.waiting, answer.active, max(1, answer.replicas)
        assert self.member is not None
        self.member.answered(answer)
        if answer.status == "unknown":
            self._sync()
        return answer

    def _failed(self, failure: Any) -> Any:
        self._lost(failure.getErrorMessage())
        raise StoreDown() from None

    def _lost(self, why: str) -> None:
        if self.up and not self._stopped:
            self.up = False
            log.error("state store {host}:{port} lost ({why}): acting alone, with at most 1/{n} of each "
                      "upstream's places, until it is back", host=self.url.host, port=self.url.port, why=why,
                      n=self.replicas_seen)
            assert self.member is not None
            self.member.store_lost()

    def run(self, script: str, *args: Any) -> Deferred[Any]:
        """A script that is not an admission step (quotas): its raw reply; StoreDown while the store is away."""
        if not self.up:
            return fail(StoreDown())
        return self._eval(script, *args).addErrback(self._failed)

    def beat(self) -> Deferred[None]:
        """Renew this replica's leases (reaping dead replicas' and handing out what they freed); rejoin if away."""
        if self._syncing:
            return succeed(None)
        if not self.up:
            if any(factory.stopped for factory in self._factories):
                self._reconnect()
            self._sync()
            return succeed(None)
        d = self.step(lua.BEAT, self.reap_after, self.balance_gap)
        d.addErrback(store_down)
        return d.addCallback(lambda _: None)

    def sync(self) -> None:
        """Tell the store again what this replica holds and waits for (it changed while the last sync ran)."""
        self._sync()

    def _reconnect(self) -> None:
        """
        New connections: txredisapi stops trying for good when its AUTH or
        SELECT fails (a wrong password, a TLS handshake refused, a Redis still
        loading); a store that may come back right must still be joined.
        """
        old, self._factories = self._factories, []
        for factory in old:
            factory.disconnect()
        self._connection = self._connect()
        self._blocking = self._connect()

    def _sync(self) -> None:
        """Tell the store everything this replica holds and waits for (first start, store back, reaped)."""
        if self._syncing or self._stopped:
            return
        self._syncing = True
        assert self.member is not None
        held, waiting, routes = self.member.sync_state()
        d = self._eval(lua.SYNC, self.replica, self.reap_after, self.balance_gap, json.dumps(held),
                       json.dumps(waiting), json.dumps(routes), self.replicas_seen, wait=True)

        def synced(reply: Sequence[Any]) -> None:
            self._syncing = False
            if reply[0] == "settling":  # (alone a little longer: the others are not all back)
                self._answered(reply)
                return
            was_up, self.up = self.up, True
            if not was_up:
                log.info("state store {host}:{port} {how}: places, queue and quotas shared with the cluster "
                         "{prefix}", host=self.url.host, port=self.url.port,
                         how="back" if self._ever_up else "joined", prefix=self.prefix)
                self._ever_up = True
                assert self.member is not None
                self.member.store_back()
                for back in self.rejoined:
                    back()
            self._answered(reply)

        def failed(failure: Any) -> None:
            self._syncing = False
            if not self._ever_up and not self._said_unreachable:  # (once: it is tried again every second)
                self._said_unreachable = True
                log.error("state store {host}:{port} unreachable ({why}): no generation starts until it answers",
                          host=self.url.host, port=self.url.port, why=failure.getErrorMessage())
            self._lost(failure.getErrorMessage())

        d.addCallbacks(synced, failed)

    def _pop(self) -> None:
        """Wait for the next place handed to one of this replica's waiters (by any replica's step)."""
        if self._stopped:
            return
        if not self.up:
            self._next_pop = self.clock.callLater(BEAT_INTERVAL, self._pop)
            return
        d = self._blocking.blpop([self.prefix + "grants:" + self.replica], timeout=1)

        def popped(reply: Any) -> None:
            if reply:
                lease, upstream = reply[1].split("\t", 1)
                assert self.member is not None
                self.member.answered(Answer("ok", self.waiting, self.active, self.replicas_seen, [(lease, upstream)]))
            self._pop()

        def failed(failure: Any) -> None:
            if self._stopped:
                return
            self._next_pop = self.clock.callLater(BEAT_INTERVAL, self._pop)

        d.addCallbacks(popped, failed)
