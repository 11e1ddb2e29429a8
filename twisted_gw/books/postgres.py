"""
The usage ledger on PostgreSQL, shared by every replica of a gateway
(C{--usage-db postgresql://user[:password]@host[:port]/dbname}).

The same columns as the SQLite ledger, plus a C{request_id} that makes each
row's insert idempotent (a batch whose commit went through but whose answer was
lost is sent again and changes nothing), and a C{user_totals} table kept in the
same transaction, from which every replica reads the per-user totals.  Rows
are kept in memory as requests finish and written in one transaction every
C{flush_interval} seconds through L{twisted.enterprise.adbapi} with
C{psycopg}, never on the reactor thread.  While the database cannot be reached
(at startup or later) the gateway keeps serving and holds the rows, up to
C{max_pending} (then the oldest are dropped, and said so), and writes them
when it is back.  After a write, at most every C{refresh_interval} seconds, the
shared totals (all time and today) are read back in the same transaction:
L{on_totals} gets them with the totals of the rows still waiting here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

import attrs
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_gw.books.accounting import UserTotals
from twisted_gw.books.ledger import COLUMNS, BatchWriter, row
from twisted_gw.books.record import RequestRecord

log = Logger(namespace="llmgw.ledger")

DAY = 86400.0
MAX_PENDING = 100_000
CONNECT_TIMEOUT = 5

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS requests (
        id BIGSERIAL PRIMARY KEY,
        request_id TEXT NOT NULL UNIQUE,
        finished_at DOUBLE PRECISION NOT NULL,
        "user" TEXT NOT NULL,
        method TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        model TEXT,
        status INTEGER NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        usage_source TEXT NOT NULL,
        queue_wait DOUBLE PRECISION NOT NULL,
        ttft DOUBLE PRECISION,
        duration DOUBLE PRECISION NOT NULL,
        tokens_per_second DOUBLE PRECISION,
        cancelled INTEGER NOT NULL,
        api TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS requests_finished_at ON requests (finished_at)",
    """CREATE TABLE IF NOT EXISTS user_totals (
        "user" TEXT PRIMARY KEY,
        requests BIGINT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cancelled BIGINT NOT NULL
    )""",
)

# Columns added since the first version, with what fills them in earlier rows (as the SQLite ledger's).
MIGRATIONS: tuple[tuple[str, str, str], ...] = ()

_QUOTED = tuple('"user"' if c == "user" else c for c in COLUMNS)
INSERT = (
    f"INSERT INTO requests (request_id, {', '.join(_QUOTED)}) VALUES ({', '.join(['%s'] * (len(COLUMNS) + 1))}) "
    'ON CONFLICT (request_id) DO NOTHING RETURNING "user", prompt_tokens, completion_tokens, cancelled'
)
ADD_TOTALS = (
    'INSERT INTO user_totals ("user", requests, prompt_tokens, completion_tokens, cancelled) '
    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (\"user\") DO UPDATE SET "
    "requests = user_totals.requests + excluded.requests, "
    "prompt_tokens = user_totals.prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = user_totals.completion_tokens + excluded.completion_tokens, "
    "cancelled = user_totals.cancelled + excluded.cancelled"
)
TOTALS = 'SELECT "user", requests, prompt_tokens, completion_tokens, cancelled FROM user_totals'
TODAY = (
    'SELECT "user", COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cancelled) FROM requests '
    'WHERE finished_at >= %s GROUP BY "user"'
)

# user -> totals, all time and today
Totals = dict[str, UserTotals]
OnTotals = Callable[[Totals, Totals], None]


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def redacted(url: str) -> str:
    """The URL with its password replaced by C{***}, for logs and startup lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _totals(rows: Any) -> Totals:
    return {user: UserTotals(int(n), int(p or 0), int(c or 0), int(x or 0)) for user, n, p, c, x in rows}


def add_rows(totals: Totals, rows: list[tuple[Any, ...]]) -> Totals:
    """C{totals} with the ledger rows C{rows} (as L{row} makes them) added, in a new mapping."""
    out = {user: attrs.evolve(t) for user, t in totals.items()}
    for r in rows:
        t = out.setdefault(r[1], UserTotals())
        t.requests += 1
        t.prompt_tokens += r[6]
        t.completion_tokens += r[7]
        t.cancelled += r[13]
    return out


def _create(cursor: Any) -> None:
    for statement in SCHEMA:
        cursor.execute(statement)
    cursor.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'requests'")
    present = {name for (name,) in cursor.fetchall()}
    for name, kind, fill in MIGRATIONS:
        if name not in present:
            cursor.execute(f"ALTER TABLE requests ADD COLUMN {name} {kind}")
            cursor.execute(fill)


class PostgresLedger(BatchWriter):
    """Appends finished requests to the shared PostgreSQL ledger, in batches, off the reactor thread."""

    def __init__(self, url: str, clock: IReactorTime, flush_interval: float = 0.5, refresh_interval: float = 2.0,
                 max_pending: int = MAX_PENDING) -> None:
        super().__init__(clock, flush_interval)
        self.url = url
        self.path = redacted(url)  # (what startup lines and logs show)
        self.refresh_interval = refresh_interval
        self.max_pending = max_pending
        self.on_totals: Optional[OnTotals] = None
        self.up = False  # the last write (or attempt) reached the database
        self.dropped = 0
        self._created = False  # (rows pending here are (request_id, *row))
        self._refreshed_at: Optional[float] = None
        self._failing = False

    def start(self) -> dict[str, UserTotals]:
        """Start the writer; the totals come later, through L{on_totals}, once the database answers."""
        self._start_writing(adbapi.ConnectionPool(
            "psycopg", self.url, cp_min=1, cp_max=1, cp_reconnect=True, cp_noisy=False,
            connect_timeout=CONNECT_TIMEOUT,
        ), now=True)
        return {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def append(self, record: RequestRecord) -> None:
        self._pending.append((uuid.uuid4().hex, *row(record, self.clock.seconds())))
        if len(self._pending) > self.max_pending:
            over = len(self._pending) - self.max_pending
            del self._pending[:over]
            self.dropped += over
            log.error("usage ledger {path} unreachable: {count} unwritten rows dropped (more than {max} held)",
                      path=self.path, count=over, max=self.max_pending)

    def flush(self) -> Deferred[None]:
        """Write what is pending in one transaction (and read the shared totals, when due); fires when done."""
        if self._pool is None or (self._writing is not None and not self._writing.called):
            return self._writing or succeed(None)
        now = self.clock.seconds()
        refresh = self._refreshed_at is None or now - self._refreshed_at >= self.refresh_interval
        if not self._pending and not refresh:
            return succeed(None)
        batch, self._pending = self._pending, []
        day_start = now - now % DAY

        def write(cursor: Any) -> Optional[tuple[Totals, Totals]]:
            if not self._created:
                _create(cursor)
            added: dict[str, list[int]] = {}
            for values in batch:
                cursor.execute(INSERT, values)
                inserted = cursor.fetchone()
                if inserted is not None:  # (None: written before, by an attempt whose answer was lost)
                    user, prompt, completion, cancelled = inserted
                    sums = added.setdefault(user, [0, 0, 0, 0])
                    for i, value in enumerate((1, prompt, completion, cancelled)):
                        sums[i] += value
            for user, (n, prompt, completion, cancelled) in sorted(added.items()):  # (a fixed order: no deadlock)
                cursor.execute(ADD_TOTALS, (user, n, prompt, completion, cancelled))
            if not refresh:
                return None
            cursor.execute(TOTALS)
            everything = _totals(cursor.fetchall())
            cursor.execute(TODAY, (day_start,))
            return everything, _totals(cursor.fetchall())

        d: Deferred[Optional[tuple[Totals, Totals]]] = self._pool.runInteraction(write)

        def done(totals: Optional[tuple[Totals, Totals]]) -> None:
            self._created = True
            self.written += len(batch)
            if self._failing or not self.up:
                log.info("usage ledger {path}: connected; {count} rows written", path=self.path, count=len(batch))
            self._failing, self.up = False, True
            if totals is not None:
                self._refreshed_at = now
                if self.on_totals is not None:
                    pending = [values[1:] for values in self._pending]
                    self.on_totals(add_rows(totals[0], pending), add_rows(totals[1], [
                        r for r in pending if r[0] >= day_start]))

        def failed(failure: Any) -> None:
            # keep the rows for the next attempt rather than lose them (their ids make a retry harmless)
            self._pending[:0] = batch
            self.up = False
            if not self._failing:
                self._failing = True
                log.error("usage ledger {path} unreachable ({error}); holding rows in memory (up to {max}) until "
                          "it is back", path=self.path, error=failure.getErrorMessage().strip(), max=self.max_pending)

        self._writing = d.addCallbacks(done, failed)
        return self._writing

    async def stop(self) -> None:
        """Write everything still pending (one last attempt), then close the connections; say what was not written."""
        await super().stop()
        if self._pending:
            log.error("usage ledger {path} unreachable at shutdown: {count} rows not written",
                      path=self.path, count=len(self._pending))
