"""Wires the gateway together: C{makeService} for twistd."""

from __future__ import annotations

import gc
import signal
import threading
from typing import Any, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from twisted_gw.accounting import Accounting
from twisted_gw.admission import Admission
from twisted_gw.auth import UserSet, UserSettings, UsersFile
from twisted_gw.channel import GatewaySite
from twisted_gw.config import Config
from twisted_gw.ledger import Ledger, load_totals
from twisted_gw.metrics import me_document, snapshot
from twisted_gw.prometheus import PrometheusMetrics
from twisted_gw.proxy import Proxy
from twisted_gw.quota import Quotas
from twisted_gw.routing import Router
from twisted_gw.tls import ReloadingContextFactory, server_endpoint
from twisted_gw.upstream import Upstream
from twisted_gw.web import GatewayApp


class Gateway(Service):
    """The gateway's parts, started and stopped with the application."""

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.tls_contexts: list[ReloadingContextFactory] = []
        self._health: list[LoopingCall] = []
        self._checking: set[Deferred[None]] = set()
        self._previous_sighup: Any = None
        self._settings_from: Optional[UserSet] = None  # the users file read that _settings came from
        self._settings: dict[str, UserSettings] = {}
        self.users = UsersFile(config.users_file, reactor, config.users_poll_interval)
        self.upstreams = [self._upstream(spec.url, spec.slots or config.max_concurrent) for spec in config.upstreams]
        self.router = Router([u.route for u in self.upstreams])
        self.admission = Admission(
            self.router, reactor, config.max_queue, config.queue_timeout, config.queue_update_interval
        )
        self.accounting = Accounting(reactor)
        self.proxy = Proxy(
            self.upstreams, self.admission, self.accounting, reactor,
            queue_events=config.queue_events, keepalive_interval=config.keepalive_interval,
            upstream_timeout=config.upstream_timeout, idle_timeout=config.idle_timeout,
            assemble_non_stream=config.assemble_non_stream,
            health_checks=config.upstream_check_interval > 0,
        )
        self.quotas = Quotas(reactor)
        self.proxy.quotas = self.quotas
        self.proxy.settings_for = self.settings_for
        self.prometheus = PrometheusMetrics(self.admission)
        self.proxy.sinks.append(self.prometheus.observe)  # (the proxy tells the quotas itself: Proxy._settle)
        self.ledger = Ledger(config.usage_db, reactor) if ledger_enabled(config.usage_db) else None
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
        )
        self.site = GatewaySite(self.app.resource(), max_body=config.max_body)

    # What the metrics endpoints read: the books of every request settled so far kept first.
    def _metrics(self) -> dict[str, Any]:
        self.proxy.keep_books()
        return snapshot(self.admission, self.accounting, self.proxy, self.router)

    def _prometheus(self) -> bytes:
        self.proxy.keep_books()
        return self.prometheus.render()

    def _me(self, user: str) -> dict[str, Any]:
        self.proxy.keep_books()
        return me_document(user, self.settings_for(user), self.accounting, self.admission, self.quotas)

    def _upstream(self, url: str, slots: Optional[int]) -> Upstream:
        """One upstream; C{slots}: its places when configured (else read from llama.cpp's /props)."""
        config = self.config
        return Upstream(
            self.reactor, url, max_connections=(slots or 4) + 8,
            api_key=config.upstream_api_key, ca_file=config.upstream_ca or None, slots=slots,
        )

    @property
    def upstream(self) -> Upstream:
        """The first upstream (the only one, usually)."""
        return self.upstreams[0]

    def check(self, upstream: Upstream) -> Deferred[None]:
        """Check one upstream, then hand out whatever places its new state frees."""
        d = upstream.check()
        self._checking.add(d)

        def checked(_: None) -> None:
            self._checking.discard(d)
            self.admission.changed()

        return d.addCallback(checked)

    def reload_tls(self) -> None:
        """Read every TLS listener's certificate and key again (SIGHUP)."""
        for factory in self.tls_contexts:
            factory.reload()

    def startService(self) -> None:
        super().startService()
        if self.tls_contexts and threading.current_thread() is threading.main_thread():
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload_tls)
            )
        self.users.load_now()
        self.users.start()
        if self.ledger is not None:
            self.accounting.restore(self.ledger.start())
            today = load_totals(self.ledger.path, self.quotas.day_start())
            self.accounting.restore_today(today)
            self.quotas.restore_today({user: t.prompt_tokens + t.completion_tokens for user, t in today.items()})
        if self.config.upstream_check_interval:
            for upstream in self.upstreams:
                loop = LoopingCall(self.check, upstream)
                loop.clock = self.reactor
                loop.start(self.config.upstream_check_interval, now=True)
                self._health.append(loop)

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
            found = self._settings[user] = self._merged_settings(current, user)
        return found

    def _merged_settings(self, users: UserSet, user: str) -> UserSettings:
        own = users.settings_of(user)
        config = self.config

        def pick(mine: Optional[int], default: Optional[int]) -> Optional[int]:
            return mine if mine is not None else default

        return UserSettings(
            weight=own.weight,
            max_concurrent=pick(own.max_concurrent, config.user_max_concurrent),
            max_queued=pick(own.max_queued, config.user_max_queued),
            tokens_per_minute=pick(own.tokens_per_minute, config.user_tokens_per_minute),
            tokens_per_day=pick(own.tokens_per_day, config.user_tokens_per_day),
        )

    def stopService(self) -> Deferred[None]:
        """
        Drain: the listeners have already stopped (they are stopped first); the
        queue is answered 503, running requests get C{drain_timeout} seconds.
        """
        super().stopService()
        for loop in self._health:
            if loop.running:
                loop.stop()
        for d in list(self._checking):
            d.cancel()
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        self.users.stop()
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        await self.proxy.drain(self.config.drain_timeout)
        if self.ledger is not None:
            await self.ledger.stop()
        for upstream in self.upstreams:
            await upstream.close()


def ledger_enabled(path: str) -> bool:
    return bool(path) and path.lower() != "none"


def makeService(config: Config, reactor: Any = None) -> MultiService:
    """The twistd application: the gateway and one listener per C{--listen}."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    top = MultiService()
    gateway = Gateway(config, reactor)
    # The modules and objects made so far live as long as the process: keep
    # them out of the collector's full passes, which then walk request objects.
    gc.collect()
    gc.freeze()
    gateway.setName("gateway")
    gateway.setServiceParent(top)
    for description in config.listen:
        endpoint, tls = server_endpoint(reactor, description)
        if tls is not None:
            gateway.tls_contexts.append(tls)
        StreamServerEndpointService(endpoint, gateway.site).setServiceParent(top)
    return top
