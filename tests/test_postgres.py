"""
The usage ledger on PostgreSQL, shared by replicas: against a real PostgreSQL (LLMGW_TEST_POSTGRES_URL, by default
the machine's postgresql://postgres@127.0.0.1:5432/test), in a database of its own made for this module and dropped
after it. Where no PostgreSQL answers the tests skip and say why; under LLMGW_REQUIRE_SERVICES=1 (CI) they fail.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import uuid
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

from support import ALICE, BOB, GatewayTestCase, chat_body, free_port, missing_service, reactor, until
from twisted.internet import endpoints, task
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.protocols.portforward import ProxyFactory

from twisted_gw import usage
from twisted_gw.testing import RunningGateway, start_gateway

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
ADMIN_URL = os.environ.get("LLMGW_TEST_POSTGRES_URL", DEFAULT_URL)


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as db:
        db.execute(sql)


_database: Optional[str] = None
_why_not: Optional[str] = None


def database() -> str:
    """The URL of this module's own database (made on first use, dropped when the process ends)."""
    global _database, _why_not
    if _database is None and _why_not is None:
        try:
            import psycopg  # noqa: F401

            name = "llmgw_test_" + uuid.uuid4().hex[:12]
            _admin(f"CREATE DATABASE {name}")
            _database = _with_database(ADMIN_URL, name)
            import atexit

            atexit.register(lambda: _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        except Exception as e:
            _why_not = f"no PostgreSQL at {ADMIN_URL} (set LLMGW_TEST_POSTGRES_URL): {str(e).strip()}"
    if _database is None:
        assert _why_not is not None
        raise missing_service(_why_not)
    return _database


def query(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as db:
        cursor = db.execute(sql, args)
        return cursor.fetchall() if cursor.description is not None else []


class PostgresTestCase(GatewayTestCase):
    timeout = 60

    def setUp(self) -> None:
        super().setUp()
        self.url = database()
        # every test starts from an empty ledger
        query(self.url, "DROP TABLE IF EXISTS requests, user_totals")

    async def second(self) -> RunningGateway:
        """Another gateway (a replica) in front of the same fake upstream, with the same users and config."""
        gw = await start_gateway(reactor, self.config)
        self.addCleanup(gw.stop)
        return gw

    async def settled(self, *gateways: RunningGateway) -> None:
        """Every request's books kept and written, and each gateway's view of the shared totals read back."""
        await task.deferLater(reactor, 0.05, lambda: None)
        for gw in gateways:
            gw.gateway.proxy.keep_books()
            gw.gateway.ledger.refresh_interval = 0
            await gw.gateway.ledger.flush()
        for gw in gateways:  # (after the last write: every replica reads the same totals)
            await gw.gateway.ledger.flush()

    def flush_connection_errors(self) -> None:
        """adbapi logs the rollback that fails on a connection the database cut, before it reconnects."""
        import psycopg
        from twisted.enterprise.adbapi import ConnectionLost

        self.flushLoggedErrors(psycopg.OperationalError, ConnectionLost)

    def users(self, gw: RunningGateway) -> dict[str, Any]:
        return {name: [t.requests, t.prompt_tokens, t.completion_tokens, t.cancelled]
                for name, t in gw.gateway.accounting.users.items()}


class SharedLedgerTests(PostgresTestCase):
    async def test_two_replicas_one_ledger_restart_and_report(self) -> None:
        await self.start(usage_db=self.url)
        other = await self.second()
        reported = []
        for gw, key, stream in ((self.gw, ALICE, False), (other, BOB, True), (other, ALICE, False)):
            reply = await self.call("POST", "/v1/chat/completions", chat_body(stream), key=key,
                                    url=gw.url)
            body = await reply.text()
            self.assertEqual(reply.code, 200)
            if not stream:
                reported.append(json.loads(body)["usage"])
        await self.settled(self.gw, other)
        rows = query(self.url, 'SELECT "user", api, prompt_tokens, completion_tokens, usage_source FROM requests '
                               "ORDER BY id")
        self.assertEqual(len(rows), 3)
        alice = [r for r in rows if r[0] == "alice"]
        self.assertEqual([(r[2], r[3]) for r in alice],
                         [(u["prompt_tokens"], u["completion_tokens"]) for u in reported])
        self.assertEqual({r[1] for r in rows}, {"chat"})
        # both replicas show the cluster's per-user totals
        expected = {"alice": [2, sum(r[2] for r in alice), sum(r[3] for r in alice), 0],
                    "bob": [1, *[sum(r[i] for r in rows if r[0] == "bob") for i in (2, 3)], 0]}
        self.assertEqual(self.users(self.gw), expected)
        self.assertEqual(self.users(other), expected)
        self.assertEqual((await self.metrics())["users"]["bob"]["requests"], 1)  # (bob went to the other one)
        # a replica restarted reads them back
        await other.stop()
        again = await self.second()
        await until(lambda: again.gateway.accounting.users)
        self.assertEqual(self.users(again), expected)
        # the report reads them, in every grouping and format
        for by in ("user", "day", "model", "api"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                self.assertEqual(usage.main(["--db", self.url, "--by", by, "--json"]), 0)
            found = json.loads(out.getvalue())
            self.assertEqual(sum(r["requests"] for r in found), 3, by)
            self.assertEqual(sum(r["total_tokens"] for r in found), sum(r[2] + r[3] for r in rows), by)
        for form in ("--csv", None):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                usage.main(["--db", self.url, "--by", "user", *([form] if form else [])])
            self.assertIn("alice", out.getvalue())
        day = time.strftime("%Y-%m-%d", time.gmtime())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            usage.main(["--db", self.url, "--by", "day", "--csv"])
        self.assertTrue(out.getvalue().splitlines()[1].startswith(day + ",3,"))

    async def test_connections_cut_mid_run_lose_and_double_nothing(self) -> None:
        await self.start(usage_db=self.url)
        for _ in range(3):
            await (await self.chat()).text()
        await self.settled(self.gw)
        database_name = urlsplit(self.url).path.lstrip("/")
        query(ADMIN_URL, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", database_name)
        for key in (ALICE, BOB, ALICE):
            await (await self.chat(key=key)).text()
        ledger = self.gw.gateway.ledger
        ledger.refresh_interval = 0
        for _ in range(20):  # (the first write after the cut fails; the pool reconnects for the next)
            self.gw.gateway.proxy.keep_books()
            await ledger.flush()
            if not ledger.pending and ledger.up:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        [(count, distinct)] = query(self.url, "SELECT COUNT(*), COUNT(DISTINCT request_id) FROM requests")
        self.assertEqual((count, distinct), (6, 6))
        self.flush_connection_errors()
        [(total,)] = query(self.url, "SELECT SUM(requests) FROM user_totals")
        self.assertEqual(total, 6)

    async def test_a_batch_sent_again_is_not_written_twice(self) -> None:
        """The commit went through but its answer was lost: the same rows are sent again, and change nothing."""
        await self.start(usage_db=self.url)
        await (await self.chat()).text()
        ledger = self.gw.gateway.ledger
        self.gw.gateway.proxy.keep_books()
        sent = list(ledger._pending)
        await ledger.flush()
        ledger._pending.extend(sent)  # (as if the first attempt had failed after its commit)
        await ledger.flush()
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM requests"), [(1,)])
        self.assertEqual(query(self.url, "SELECT requests FROM user_totals"), [(1,)])


class AwayTests(PostgresTestCase):
    """A PostgreSQL reached through a forwarder the test starts and stops: away at startup, gone, back."""

    forwarder: Optional[IListeningPort] = None

    async def open_forwarder(self, port: int) -> None:
        target = urlsplit(self.url)
        factory = ProxyFactory(target.hostname or "127.0.0.1", target.port or 5432)
        self.factory = factory
        self.forwarder = await endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(factory)

    async def close_forwarder(self) -> None:
        if self.forwarder is not None:
            await maybeDeferred(self.forwarder.stopListening)
            self.forwarder = None
        database_name = urlsplit(self.url).path.lstrip("/")
        query(ADMIN_URL, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", database_name)

    async def test_away_at_startup_and_later_then_back(self) -> None:
        port = free_port()
        parts = urlsplit(self.url)
        through = urlunsplit(parts._replace(netloc=parts.netloc.replace(
            f"{parts.hostname}:{parts.port or 5432}", f"127.0.0.1:{port}")))
        self.addCleanup(self.close_forwarder)
        await self.start(usage_db=through)
        ledger = self.gw.gateway.ledger
        ledger.refresh_interval = 0
        for _ in range(3):
            reply = await self.chat()
            self.assertEqual(reply.code, 200)  # served while the ledger is away
            await reply.text()
        self.gw.gateway.proxy.keep_books()
        await ledger.flush()
        self.assertEqual((ledger.up, ledger.pending), (False, 3))
        exposition = (await (await self.call("GET", "/metrics/prometheus", key=None)).text()).decode()
        self.assertIn("llmgw_ledger_up 0.0", exposition)
        self.assertIn("llmgw_ledger_pending_rows 3.0", exposition)
        # back
        await self.open_forwarder(port)
        await until(lambda: ledger.up and not ledger.pending)
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM requests"), [(3,)])
        await until(lambda: self.gw.gateway.accounting.users.get("alice") is not None)
        # gone again, with requests finishing meanwhile, and back
        await self.close_forwarder()
        for _ in range(2):
            await (await self.chat(key=BOB)).text()
        await until(lambda: not ledger.up and ledger.pending == 2)
        await self.open_forwarder(port)
        await until(lambda: ledger.up and not ledger.pending, 20)
        self.assertEqual(query(self.url, "SELECT COUNT(*), COUNT(DISTINCT request_id) FROM requests"), [(5, 5)])
        self.assertEqual(sorted(query(self.url, 'SELECT "user", requests FROM user_totals')),
                         [("alice", 3), ("bob", 2)])
        self.flush_connection_errors()


class PostgresKillTests(PostgresTestCase):
    timeout = 90

    async def test_sigkill_under_load_loses_at_most_the_last_second(self) -> None:
        finished, killed = await self.kill_under_load(self.url)
        [(rows,)] = query(self.url, "SELECT COUNT(*) FROM requests")
        settled = [t for t in finished if t < killed - 1.0]
        self.assertGreater(len(settled), 20)
        self.assertGreaterEqual(rows, len(settled))
        self.assertLessEqual(rows, len(finished) + 6)
