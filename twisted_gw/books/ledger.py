"""
The usage ledger: one SQLite row per finished request, so that usage survives
restarts.

Rows are kept in memory as requests finish and written in one transaction every
C{flush_interval} seconds through L{twisted.enterprise.adbapi} (a single
database thread), never on the reactor thread.  A process killed outright loses
at most the rows of the last interval.  The database is in WAL mode, so the
report command can read it while the gateway writes.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Optional

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twisted_gw.books.accounting import UserTotals
from twisted_gw.books.record import RequestRecord


def ledger_enabled(path: str) -> bool:
    """Whether C{--usage-db} names a ledger (empty and C{none} are none)."""
    return bool(path) and path.lower() != "none"


log = Logger(namespace="llmgw.ledger")

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    finished_at REAL NOT NULL,
    user TEXT NOT NULL,
    method TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    usage_source TEXT NOT NULL,
    queue_wait REAL NOT NULL,
    ttft REAL,
    duration REAL NOT NULL,
    tokens_per_second REAL,
    cancelled INTEGER NOT NULL,
    api TEXT
);
CREATE INDEX IF NOT EXISTS requests_finished_at ON requests (finished_at);
"""

# Columns added since the first ledger, with what fills them in the rows written before: added at startup.
# (the API of a row written before the column was, as twisted_gw.apis.kinds.api_of would have named it)
API_OF_ENDPOINT = """CASE endpoint
    WHEN '/v1/chat/completions' THEN 'chat' WHEN '/v1/completions' THEN 'completions'
    WHEN '/v1/responses' THEN 'responses' WHEN '/v1/messages' THEN 'messages'
    WHEN '/v1/embeddings' THEN 'embeddings' WHEN '/v1/messages/count_tokens' THEN 'count_tokens'
    WHEN '/v1/models' THEN 'models' ELSE 'other' END"""
MIGRATIONS = (
    ("api", "TEXT", f"UPDATE requests SET api = {API_OF_ENDPOINT}"),
)

COLUMNS = (
    "finished_at", "user", "method", "endpoint", "model", "status", "prompt_tokens", "completion_tokens",
    "usage_source", "queue_wait", "ttft", "duration", "tokens_per_second", "cancelled", "api",
)

INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def connect(path: str) -> sqlite3.Connection:
    """Open (and create) the ledger with its schema, in WAL mode; a ledger of an earlier version is migrated."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    migrate(db)
    return db


def migrate(db: sqlite3.Connection) -> None:
    """Add the columns an earlier ledger lacks, filled for its rows, in one transaction."""
    present = {column[1] for column in db.execute("PRAGMA table_info(requests)")}
    missing = [m for m in MIGRATIONS if m[0] not in present]
    if not missing:
        return
    with db:
        for name, kind, fill in missing:
            db.execute(f"ALTER TABLE requests ADD COLUMN {name} {kind}")
            db.execute(fill)
    log.info("usage ledger: added the column(s) {names} to the earlier ledger's rows",
             names=", ".join(m[0] for m in missing))


def load_totals(path: str, since: float = 0.0) -> dict[str, UserTotals]:
    """Per-user totals from the ledger (of requests finished since C{since}); read at startup."""
    db = connect(path)
    try:
        rows = db.execute(
            "SELECT user, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cancelled) "
            "FROM requests WHERE finished_at >= ? GROUP BY user", (since,),
        ).fetchall()
    finally:
        db.close()
    return {user: UserTotals(n, prompt or 0, completion or 0, cancelled or 0) for user, n, prompt, completion, cancelled
            in rows}


def row(record: RequestRecord, finished_at: float) -> tuple[Any, ...]:
    return (
        finished_at, record.user, record.method, record.path, record.model, record.status, record.prompt_tokens,
        record.completion_tokens, record.usage_source, record.queue_wait, record.ttft, record.duration,
        record.tokens_per_second, int(record.cancelled), record.api,
    )


def _prepare(connection: Any) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")


class BatchWriter:
    """
    Rows kept in memory as requests finish and written by an adbapi pool in
    batches, every C{flush_interval} seconds (L{flush}), never on the reactor
    thread; what both ledgers share.
    """

    def __init__(self, clock: IReactorTime, flush_interval: float) -> None:
        self.clock = clock
        self.flush_interval = flush_interval
        self.written = 0
        self._pending: list[tuple[Any, ...]] = []
        self._pool: Optional[adbapi.ConnectionPool] = None
        self._loop: Optional[LoopingCall] = None
        self._writing: Optional[Deferred[Any]] = None

    def flush(self) -> Deferred[None]:
        raise NotImplementedError

    def _start_writing(self, pool: adbapi.ConnectionPool, now: bool) -> None:
        """Write with C{pool} every C{flush_interval} seconds (the first time at once when C{now})."""
        self._pool = pool
        loop = LoopingCall(self.flush)
        loop.clock = self.clock
        loop.start(self.flush_interval, now=now)
        self._loop = loop

    async def stop(self) -> None:
        """Write everything still pending (one last attempt), then close the database."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._writing is not None:
            await self._writing
        await self.flush()
        if self._pool is not None:
            self._pool.close()
            self._pool = None


class Ledger(BatchWriter):
    """Appends finished requests to the SQLite ledger, in batches, off the reactor thread."""

    def __init__(self, path: str, clock: IReactorTime, flush_interval: float = 0.5) -> None:
        super().__init__(clock, flush_interval)
        self.path = path

    def start(self) -> dict[str, UserTotals]:
        """Create the ledger if needed, start the writer, and return the per-user totals so far."""
        totals = load_totals(self.path)
        self._start_writing(adbapi.ConnectionPool(
            "sqlite3", self.path, check_same_thread=False, cp_min=1, cp_max=1, cp_openfun=_prepare,
        ), now=False)
        return totals

    def append(self, record: RequestRecord) -> None:
        self._pending.append(row(record, self.clock.seconds()))

    def flush(self) -> Deferred[None]:
        """Write what is pending in one transaction; fires when written."""
        if not self._pending or self._pool is None:
            return self._writing or succeed(None)
        batch, self._pending = self._pending, []

        def write(cursor: Any) -> None:
            cursor.executemany(INSERT, batch)

        d: Deferred[None] = self._pool.runInteraction(write)

        def done(_: object) -> None:
            self.written += len(batch)

        def failed(failure: Any) -> None:
            # keep the rows for the next attempt rather than lose them
            self._pending[:0] = batch
            log.failure("writing {count} rows to the usage ledger {path}", failure, count=len(batch), path=self.path)

        d.addCallbacks(done, failed)
        self._writing = d
        return d
