"""Wires the gateway together: C{makeService} for twistd."""

from __future__ import annotations

import gc
import signal
import threading
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_gw import startup
from twisted_gw.admission import DOWN, LOADING, OK, Admission, Availability, Route, Router, UserSettings
from twisted_gw.admission.prefix import PrefixIndex
from twisted_gw.admission.quota import Quotas
from twisted_gw.admission.shared import SharedAdmission
from twisted_gw.admission.shared_quotas import SharedQuotas
from twisted_gw.admission.store import RedisStore
from twisted_gw.books.accounting import Accounting, UserTotals
from twisted_gw.books.ledger import Ledger, ledger_enabled, load_totals
from twisted_gw.books.metrics import me_document, snapshot
from twisted_gw.books.postgres import PostgresLedger, is_postgres
from twisted_gw.books.prometheus import PrometheusMetrics
from twisted_gw.config import Config
from twisted_gw.proxy import Proxy
from twisted_gw.tls import ReloadingContextFactory, server_endpoint
from twisted_gw.upstream import Upstream
from twisted_gw.upstream.client import tls_policy
from twisted_gw.upstream.health import Health, probe
from twisted_gw.web import GatewayApp, GatewaySite
from twisted_gw.web.users import UserSet, UsersFile

log = Logger(namespace="llmgw")

# Seconds the client connections have to take the last answers, once the requests are drained.
CLOSE_TIMEOUT = 5.0


class Gateway(Service):
    """
    The gateway's parts, started and stopped with the application, and its
    listeners (C{listen}: descriptions and endpoints), opened before the
    reactor runs and closed before it drains.  C{clock}: the time of the
    queue, the proxy and the books (the reactor's unless a test gives its
    own); connections and files use the reactor.
    """

    def __init__(self, config: Config, reactor: Any, clock: Optional[IReactorTime] = None) -> None:
        clock = reactor if clock is None else clock
        self.listen: list[tuple[str, IStreamServerEndpoint]] = []
        self.ports: list[tuple[str, IListeningPort]] = []
        self.config = config
        self.reactor = reactor
        self.tls_contexts: list[ReloadingContextFactory] = []
        self._health: list[LoopingCall] = []
        self._checking: set[Deferred[Health]] = set()
        self._previous_sighup: Any = None
        self._settings_from: Optional[UserSet] = None  # the users file read that _settings came from
        self._settings: dict[str, UserSettings] = {}
        self.defaults = UserSettings(
            max_concurrent=config.user_max_concurrent, max_queued=config.user_max_queued,
            tokens_per_minute=config.user_tokens_per_minute, tokens_per_day=config.user_tokens_per_day,
        )
        self.users = UsersFile(config.users_file, reactor, config.users_poll_interval)
        upstreams = [(self._upstream(spec.url, spec.slots), spec.slots) for spec in config.upstreams]
        # (routes are named by their URL without credentials: the names are in /metrics and in the logs)
        self.upstreams = {
            Route(upstream.base_url, slots=slots or config.max_concurrent): upstream for upstream, slots in upstreams
        }
        self.router = Router(list(self.upstreams))
        if config.routing == "cache-aware" and len(self.upstreams) > 1:
            self.router.index = PrefixIndex(config.routing_cache_mb * 1024 * 1024)
            self.router.min_match = config.routing_min_match
            self.router.balance_gap = config.routing_balance_gap
        self.store: Optional[RedisStore] = None
        self.quotas = Quotas(clock)
        if config.state:
            self.store = RedisStore(config.state, config.cluster, reactor, config.lease_timeout,
                                    config.routing_balance_gap)
            if config.state_ca:  # (a private CA: verified as an https:// upstream would be)
                where = self.store.url
                self.store.tls = tls_policy(config.state_ca).creatorForNetloc(where.host.encode(), where.port)
            self.admission: Admission = SharedAdmission(self.router, clock, self.store, config.max_queue,
                                                        config.queue_timeout, config.queue_update_interval)
            self.quotas = SharedQuotas(clock, self.store)
            self.store.rejoined.append(self.quotas.store_back)
        else:
            self.admission = Admission(self.router, clock, config.max_queue, config.queue_timeout,
                                       config.queue_update_interval)
        self.availability = Availability(clock, self.router, config.upstream_down_grace,
                                         self.admission.upstreams_available)
        self.accounting = Accounting(clock)
        self.proxy = Proxy(
            self.upstreams, self.admission, clock, self.quotas, self.settings_for,
            self.accounting.average_response_time,
            queue_events=config.queue_events, keepalive_interval=config.keepalive_interval,
            upstream_timeout=config.upstream_timeout, idle_timeout=config.idle_timeout,
            assemble_non_stream=config.assemble_non_stream, health_checks=config.upstream_check_interval > 0,
        )
        self.prometheus = PrometheusMetrics(self.admission)
        if self.store is not None:
            self.prometheus.watch_store(self.store)
        self.proxy.sinks.extend([self.accounting.record, self.prometheus.observe])
        self.ledger: Optional[Ledger | PostgresLedger] = None
        if is_postgres(config.usage_db):
            self.ledger = PostgresLedger(config.usage_db, clock)
            self.ledger.on_totals = self._shared_totals
            self.prometheus.watch_ledger(self.ledger)
        elif ledger_enabled(config.usage_db):
            self.ledger = Ledger(config.usage_db, clock)
        self._quotas_restored = False
        if self.ledger is not None:
            self.proxy.sinks.append(self.ledger.append)
        self.app = GatewayApp(
            self.proxy,
            lambda key: self.users.current.lookup(key),
            self._metrics,
            self._prometheus,
            self._me,
            metrics_token=config.metrics_token,
            public_metrics=config.public_metrics,
            metrics_allow=config.metrics_allow,
            upstreams_up=lambda: any(route.routable for route in self.router.routes),
        )
        self.site = GatewaySite(self.app.resource(), max_body=config.max_body, header_timeout=config.header_timeout,
                                early_refusal=self.app.early_refusal)

    # What the metrics endpoints read: the books of every request settled so far kept first.
    def _metrics(self) -> dict[str, Any]:
        self.proxy.keep_books()
        return snapshot(self.admission, self.accounting, self.proxy.live(), self.router)

    def _prometheus(self) -> bytes:
        self.proxy.keep_books()
        return self.prometheus.render()

    def _me(self, user: str) -> dict[str, Any]:
        self.proxy.keep_books()
        return me_document(user, self.settings_for(user), self.accounting, self.admission, self.quotas)

    def _upstream(self, url: str, slots: Optional[int]) -> Upstream:
        """One upstream, its places as configured (llama.cpp's are read later, by the health checks)."""
        config = self.config
        return Upstream(self.reactor, url, places=slots or config.max_concurrent or 1,
                        api_key=config.upstream_api_key, ca_file=config.upstream_ca or None)

    def check(self, route: Route) -> Deferred[None]:
        """Check one upstream, then hand out whatever places its new state frees."""
        d = Deferred.fromCoroutine(probe(self.upstreams[route], route.needs_props))
        self._checking.add(d)

        def checked(health: Health) -> None:
            self._checking.discard(d)
            if not self.running:  # (a check cancelled by the shutdown reads as down: nothing to act on now)
                return
            was = route.state
            route.update(health.state, health.slots, health.models, health.read_props)
            self.upstreams[route].keep_connections(route.places)
            if route.state != was:
                self._log_health(route, health)
                if route.state == OK and was in (DOWN, LOADING):  # (back from a restart: its cache is empty)
                    self.router.restarted(route)
            self.availability.update()
            self.admission.changed()

        return d.addCallback(checked)

    def _log_health(self, route: Route, health: Health) -> None:
        """An upstream's state changed: say so, once."""
        name = startup.redacted(route.name)
        if route.state == OK:
            source = route.describe()["places_from"]
            how = {"props": "from /props", "configured": "configured"}.get(source, "by default")
            log.info("upstream {upstream} up: {places} places {how}", upstream=name, places=route.places, how=how)
        elif route.state == LOADING:
            log.warn("upstream {upstream} loading (it answers 503; requests wait for it)", upstream=name)
        elif route.state == DOWN:
            log.error("upstream {upstream} down: {reason}", upstream=name, reason=health.reason or "no answer")

    def privilegedStartService(self) -> None:
        """
        Listen, before the reactor runs: an endpoint that cannot be listened
        on stops the process with one line saying which and why.
        """
        super().privilegedStartService()
        for description, endpoint in self.listen:
            outcome: list[Any] = []
            endpoint.listen(self.site).addBoth(outcome.append)
            if outcome and isinstance(outcome[0], Failure):
                for _, port in self.ports:
                    port.stopListening()
                raise SystemExit(f"llmgw: error: cannot listen on {description}: {outcome[0].getErrorMessage()}")
            if outcome:
                self.ports.append((description, outcome[0]))
            else:
                log.warn("listening on {description} did not start at once", description=description)

    def reload_tls(self) -> None:
        """Read every TLS listener's certificate and key again."""
        for factory in self.tls_contexts:
            factory.reload()

    def reload(self) -> Deferred[None]:
        """
        SIGHUP (C{systemctl reload}): the TLS certificates and the users file
        read again now, without waiting for the next poll.
        """
        log.info("reloading on SIGHUP: {what}",
                 what="TLS certificates and the users file" if self.tls_contexts else "the users file")
        self.reload_tls()
        return self.users.poll()

    def _say_where_things_are(self) -> None:
        """One line for each part a misconfiguration would leave useless."""
        config = self.config
        for description, port in self.ports:
            log.info("{line}", line=startup.listening(description, port))
        for spec in config.upstreams:
            log.info("{line}", line=startup.upstream(config, spec.url, spec.slots))
        log.info("{line}", line=startup.ledger(self.ledger.path if self.ledger is not None else ""))
        if self.ports:
            log.info("{line}", line=startup.dashboard(config, *self.ports[0]))

    def startService(self) -> None:
        super().startService()
        self._say_where_things_are()
        if threading.current_thread() is threading.main_thread():
            # always: SIGHUP's default would end the process (systemd's ExecReload sends it)
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload)
            )
        self.users.load_now()
        self.users.start()
        if self.store is not None:
            assert isinstance(self.admission, SharedAdmission)
            self.store.start(self.admission)
        if isinstance(self.ledger, PostgresLedger):
            self.ledger.start()  # (its totals come when its database answers: _shared_totals)
        elif self.ledger is not None:
            self.accounting.restore(self.ledger.start())
            today = load_totals(self.ledger.path, self.quotas.day_start())
            self.accounting.restore_today(today)
            self.quotas.restore_today({user: t.prompt_tokens + t.completion_tokens for user, t in today.items()})
        if self.config.upstream_check_interval:
            for route in self.upstreams:
                loop = LoopingCall(self.check, route)
                loop.clock = self.reactor
                loop.start(self.config.upstream_check_interval, now=True)  # (a check at once, at startup)
                self._health.append(loop)

    def _shared_totals(self, users: dict[str, UserTotals], today: dict[str, UserTotals]) -> None:
        """The shared ledger's totals (every replica's rows, and this one's still unwritten): the books' base."""
        # (records not kept yet are not in them: the books add them when they keep them)
        self.accounting.rebase(users, today)
        if not self._quotas_restored:  # (today's quotas, once at startup; this replica counts its own after)
            self._quotas_restored = True
            self.quotas.restore_today({user: t.prompt_tokens + t.completion_tokens for user, t in today.items()})

    def settings_for(self, user: str) -> UserSettings:
        """
        The user's own settings, with the gateway-wide defaults where it has
        none; made once per user for each users file read (they are frozen).
        """
        current = self.users.current
        if current is not self._settings_from:
            self._settings_from = current
            self._settings = {}
        found = self._settings.get(user)
        if found is None:
            found = self._settings[user] = current.settings_of(user).with_defaults(self.defaults)
        return found

    def stopService(self) -> Deferred[None]:
        """
        Stop the listeners, then drain: the queue is answered 503, running
        requests get C{drain_timeout} seconds.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        super().stopService()
        # the listeners are closed before anyone is told that the gateway is shutting down
        await DeferredList([maybeDeferred(port.stopListening) for _, port in self.ports])
        self.availability.stop()
        for loop in self._health:
            if loop.running:
                loop.stop()
        for d in list(self._checking):
            d.cancel()
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        self.users.stop()
        await self.proxy.drain(self.config.drain_timeout)
        if self.store is not None:
            await self.store.stop()  # (what it still held goes back to the cluster at once)
        # (the last answers sent before the reactor stops, which drops whatever is still unsent)
        await self.site.close_connections(self.reactor, CLOSE_TIMEOUT)
        if self.ledger is not None:
            await self.ledger.stop()
        for upstream in self.upstreams.values():
            await upstream.close()


def makeService(config: Config, reactor: Any = None) -> Gateway:
    """The twistd application: the gateway and one listener per C{--listen}."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    gateway = Gateway(config, reactor)
    # The modules and objects made so far live as long as the process: keep
    # them out of the collector's full passes, which then walk request objects.
    gc.collect()
    gc.freeze()
    gateway.setName("gateway")
    for description in config.listen:
        endpoint, tls = server_endpoint(reactor, description)
        if tls is not None:
            gateway.tls_contexts.append(tls)
        gateway.listen.append((description, endpoint))
    return gateway
