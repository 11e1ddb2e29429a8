"""
The books hand-off: a finished request's record (what it cost) given to
every sink (totals, ledger, Prometheus) and its access line logged.

Records are kept on the reactor's next turn, after the answer has been
written, so that a request's answer never waits for its books; L{keep} keeps
them at once, before anything reads them (the metrics, a shutdown).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_gw.apis.errors import GatewayError
from twisted_gw.books.record import RequestRecord
from twisted_gw.proxy.client import ClientRequest
from twisted_gw.proxy.exchange import Exchange

log = Logger(namespace="llmgw.access")

Sink = Callable[[RequestRecord], None]


def record_of(ex: Exchange, ended: float) -> RequestRecord:
    """What C{ex}, which ended at C{ended}, cost."""
    usage = ex.final_usage()
    ttft = None if ex.first_token_at is None else ex.first_token_at - ex.started
    generating = None if ex.first_token_at is None else ended - ex.first_token_at
    speed = usage.completion_tokens / generating if generating and usage.completion_tokens else None
    return RequestRecord(
        user=ex.user,
        method=ex.request.method.decode("ascii", "replace"),
        path=ex.request.path.decode("ascii", "replace"),
        status=ex.status,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        duration=ended - ex.started,
        queue_wait=ex.queue_wait,
        cancelled=ex.cancelled,
        usage_source=usage.source,
        model=ex.model,
        ttft=ttft,
        tokens_per_second=speed,
        error=ex.error,
        api=ex.api,
    )


def log_access(record: RequestRecord) -> None:
    """
    A finished request's access line, made here once (Twisted's formatter
    would make it from ten fields for every observer); its fields are the
    event's too, for the JSON log.
    """
    note = (" (cancelled)" if record.cancelled else "") + (" (estimated)" if record.usage_source == "estimate" else "")
    log.info(
        "{access}",
        access=f"{record.method} {record.path} {record.status} user={record.user} wait={record.queue_wait:.3f}s "
               f"time={record.duration:.3f}s tokens={record.prompt_tokens}+{record.completion_tokens}{note}",
        method=record.method, path=record.path, status=record.status, user=record.user, api=record.api,
        model=record.model, queue_wait=record.queue_wait, ttft=record.ttft, duration=record.duration,
        prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
        tokens_per_second=record.tokens_per_second, usage_source=record.usage_source,
        cancelled=record.cancelled, error=record.error,
    )


def log_refused(request: ClientRequest, user: Optional[str], error: GatewayError) -> None:
    """The access line of a request refused before it was proxied (a bad key, bad input)."""
    log.info(
        "{method} {path} {status} user={user} refused: {error}",
        method=request.method.decode("ascii", "replace"), path=request.path.decode("ascii", "replace"),
        status=error.status, user=user, error=error.code, cancelled=False,
    )


@attrs.define
class Books:
    """Hands finished requests' records to C{sinks}."""

    clock: IReactorTime
    sinks: list[Sink] = attrs.Factory(list)
    _pending: list[tuple[Exchange, float]] = attrs.Factory(list)
    _call: Optional[IDelayedCall] = None

    def hand_off(self, ex: Exchange, ended: float) -> None:
        """C{ex} ended at C{ended}: its books are kept on the reactor's next turn."""
        self._pending.append((ex, ended))
        if self._call is None:
            self._call = self.clock.callLater(0, self.keep)

    def keep(self) -> None:
        """Keep the books of every request handed off so far."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        while self._pending:
            pending, self._pending = self._pending, []
            for ex, ended in pending:
                try:
                    record = record_of(ex, ended)
                    for sink in self.sinks:
                        sink(record)
                    log_access(record)
                except Exception:
                    log.failure("Keeping the books of a request failed")
