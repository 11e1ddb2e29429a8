"""Exact usage, the ledger and its report, Prometheus metrics, metrics protection, structured logs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import (
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families
from support import (
    ALICE,
    BOB,
    TWISTD,
    USAGE,
    GatewayTestCase,
    chat_body,
    content_needle,
    reactor,
    settle,
    sse_data,
    until,
)
from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, eventAsText, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from twisted_gw import usage
from twisted_gw.admission import Admission, Router
from twisted_gw.apis.errors import GatewayError
from twisted_gw.books import prometheus
from twisted_gw.books.ledger import INSERT, SCHEMA
from twisted_gw.books.record import RequestRecord
from twisted_gw.testing import FakeLlama
from twisted_gw.web.access import parse_networks


def normalised(body: bytes) -> bytes:
    body = re.sub(rb'"id":"[^"]*"', b'"id":"X"', body)
    return re.sub(rb'"created":\d+', b'"created":0', body)


class ExactUsageTests(GatewayTestCase):
    async def test_injected_usage_is_invisible_to_the_client(self) -> None:
        await self.start(fake=FakeLlama(reactor, flavour="openai", cache_n=2))
        via = await (await self.chat(stream=True)).text()
        direct = await (await self.call("POST", "/v1/chat/completions", chat_body(True), url=self.fake.url)).text()
        self.assertEqual(normalised(via), normalised(direct))
        self.assertNotIn(b'"usage"', via)
        # the upstream was asked for usage, and its numbers are what was counted
        upstream = self.fake.generations[-2]
        self.assertEqual(upstream.json()["stream_options"], {"include_usage": True})
        usage_chunk = json.loads(upstream.events[-1])
        self.assertEqual(usage_chunk["choices"], [])
        metrics = await self.metrics()
        self.assertEqual(metrics["users"]["alice"]["prompt_tokens"], usage_chunk["usage"]["prompt_tokens"])
        self.assertEqual(metrics["users"]["alice"]["completion_tokens"], usage_chunk["usage"]["completion_tokens"])

    async def test_client_that_asked_for_usage_gets_it_untouched(self) -> None:
        await self.start(fake=FakeLlama(reactor, flavour="openai"))
        body = chat_body(True, stream_options={"include_usage": True})
        via = await (await self.call("POST", "/v1/chat/completions", body)).text()
        direct = await (await self.call("POST", "/v1/chat/completions", body, url=self.fake.url)).text()
        self.assertEqual(normalised(via), normalised(direct))
        self.assertEqual(sum(1 for d in sse_data(via) if b'"usage":{' in d), 1)
        self.assertIn(b'"usage":null', via)

    async def test_llamacpp_is_never_asked_for_usage(self) -> None:
        await self.start(fake=FakeLlama(reactor, cache_n=3))
        via = await (await self.chat(stream=True)).text()
        self.assertNotIn("stream_options", self.fake.generations[-1].json())
        last = json.loads(sse_data(via)[-2])
        self.assertIn("timings", last)  # the timings stay where the client expects them
        metrics = await self.metrics()
        self.assertEqual(metrics["users"]["alice"]["prompt_tokens"], last["timings"]["prompt_n"] + 3)

    async def test_completions_and_non_stream_counts(self) -> None:
        await self.start(fake=FakeLlama(reactor, flavour="openai"))
        completions = json.dumps({"model": "m", "prompt": "one two three", "stream": True}).encode()
        await (await self.call("POST", "/v1/completions", completions)).text()
        doc = await (await self.chat(stream=False)).json()
        metrics = await self.metrics()
        self.assertEqual(metrics["users"]["alice"]["requests"], 2)
        self.assertEqual(metrics["users"]["alice"]["completion_tokens"], 2 * len(self.fake.reply))
        self.assertEqual(metrics["users"]["alice"]["prompt_tokens"], 7 + doc["usage"]["prompt_tokens"])


class LedgerTests(GatewayTestCase):
    async def test_rows_restart_and_report(self) -> None:
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        await self.start(fake=FakeLlama(reactor, manual=True), usage_db=db)
        stream = await self.chat(stream=True, key=ALICE)
        self.fake.release(len(self.fake.reply))
        await stream.text()
        cut = await self.chat(stream=True, key=BOB)
        self.fake.release(2)
        await cut.body.wait_for(content_needle(","))
        cut.body.abort()
        await self.fake.generations[-1].ended
        await until(lambda: not self.gw.gateway.proxy.counting)  # (its prompt, counted by the upstream)
        plain = Deferred.fromCoroutine(self.chat(stream=False, key=ALICE))
        self.fake.release(len(self.fake.reply))
        await (await plain).text()
        await settle()  # (its books are kept within books_delay)
        await self.gw.gateway.ledger.flush()
        rows = sqlite3.connect(db).execute(
            "SELECT user, endpoint, model, status, prompt_tokens, completion_tokens, usage_source, ttft, cancelled "
            "FROM requests ORDER BY id"
        ).fetchall()
        self.assertEqual(len(rows), 3)
        self.assertEqual(rows[0][:7], ("alice", "/v1/chat/completions", "fake-llama", 200, 7, 8, "timings"))
        self.assertIsNotNone(rows[0][7])
        self.assertEqual(rows[1][0], "bob")
        self.assertEqual((rows[1][5], rows[1][6], rows[1][8]), (2, "estimate", 1))
        self.assertEqual(rows[2][5:7], (8, "usage"))
        before = (await self.metrics())["users"]
        await self.gw.stop()

        # a new gateway on the same ledger starts from the same totals
        await self.start(usage_db=db)
        self.assertEqual((await self.metrics())["users"], before)

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(usage.main(["--db", db, "--by", "user", "--json"]), 0)
        by_user = {row["user"]: row for row in json.loads(out.getvalue())}
        self.assertEqual(by_user["alice"]["completion_tokens"], 16)
        # bob left mid-stream: billed the prompt the upstream read (as alice's same request reported it)
        prompt = rows[0][4]
        self.assertEqual(by_user["bob"], {"user": "bob", "requests": 1, "prompt_tokens": prompt, "completion_tokens": 2,
                                          "total_tokens": prompt + 2, "cancelled": 1, "estimated": 1})
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            usage.main(["--db", db, "--by", "day"])
        table = out.getvalue().splitlines()
        self.assertTrue(table[0].startswith("day"))
        self.assertEqual(table[2].split()[0], time.strftime("%Y-%m-%d", time.gmtime()))
        self.assertEqual(table[-1].split()[:2], ["total", "3"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            usage.main(["--db", db, "--by", "model", "--csv", "--since", "2999-01-01"])
        self.assertEqual(out.getvalue(), "model,requests,prompt_tokens,completion_tokens,total_tokens,cancelled,"
                                         "estimated\n")

    async def test_an_earlier_ledger_is_migrated_in_place(self) -> None:
        """A ledger written before the api column: its rows gain it at startup, and keep their totals."""
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        earlier = sqlite3.connect(db)
        earlier.executescript(SCHEMA.replace(",\n    api TEXT\n", "\n"))
        old_columns = INSERT.replace(", api)", ")").replace(", ?)", ")")
        for endpoint, tokens in (("/v1/chat/completions", 3), ("/v1/completions", 5), ("/v1/models", 0)):
            earlier.execute(old_columns, (2.0, "alice", "POST", endpoint, None, 200, tokens, 1, "usage", 0.0, None,
                                          1.0, None, 0))
        earlier.commit()
        earlier.close()
        # the report reads it before any gateway migrated it
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(usage.main(["--db", db, "--by", "api", "--json"]), 0)
        self.assertEqual([(r["api"], r["prompt_tokens"]) for r in json.loads(out.getvalue())],
                         [("chat", 3), ("completions", 5), ("models", 0)])
        await self.start(usage_db=db)
        self.assertEqual((await self.metrics())["users"]["alice"]["prompt_tokens"], 8)
        await (await self.chat()).text()
        await settle()
        await self.gw.gateway.ledger.flush()
        rows = sqlite3.connect(db).execute("SELECT endpoint, api FROM requests ORDER BY id").fetchall()
        self.assertEqual(rows, [("/v1/chat/completions", "chat"), ("/v1/completions", "completions"),
                                ("/v1/models", "models"), ("/v1/chat/completions", "chat")])

    async def test_online_backup_while_running_and_restore(self) -> None:
        """docs/operations.md's backup and restore: the copy holds what was written when it was taken."""
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        await self.start(usage_db=db)
        for key in (ALICE, BOB, ALICE):
            await (await self.chat(key=key)).text()
        await settle()
        await self.gw.gateway.ledger.flush()
        at_backup = (await self.metrics())["users"]
        copy = os.path.abspath(self.mktemp()) + ".sqlite3"
        done = await deferToThread(subprocess.run, [USAGE, "--db", db, "--backup", copy],
                                   capture_output=True, text=True, timeout=60)
        self.assertEqual((done.returncode, done.stdout), (0, ""), done.stderr)
        self.assertIn(f"backed up {db} to {copy}", done.stderr)
        self.assertFalse(os.path.exists(copy + "-wal"))
        await (await self.chat(key=BOB)).text()  # after the backup: not in it
        await settle()
        await self.gw.stop()

        # restore: the gateway stopped, the copy in place, no -wal or -shm of the old file left beside it
        os.replace(copy, db)
        for leftover in (db + "-wal", db + "-shm"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        await self.start(usage_db=db)
        self.assertEqual((await self.metrics())["users"], at_backup)
        self.assertEqual(sqlite3.connect(db).execute("SELECT COUNT(*) FROM requests").fetchone(), (3,))

    async def test_a_backup_that_cannot_be_written_says_so(self) -> None:
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        await self.start(usage_db=db)
        await self.gw.gateway.ledger.flush()
        nowhere = os.path.join(os.path.abspath(self.mktemp()), "missing-folder", "copy.sqlite3")
        done = await deferToThread(subprocess.run, [USAGE, "--db", db, "--backup", nowhere],
                                   capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 1)
        self.assertIn(f"llmgw-usage: cannot back up {db} to {nowhere}", done.stderr)
        self.assertNotIn("Traceback", done.stderr)


class UsageCommandTests(SynchronousTestCase):
    """C{llmgw-usage}, installed with the package, finds the ledger or says where it looked."""

    def setUp(self) -> None:
        self.elsewhere = os.path.abspath(self.mktemp())  # a folder that is not the gateway's
        os.makedirs(self.elsewhere)
        self.db = os.path.abspath(self.mktemp()) + ".sqlite3"
        ledger = sqlite3.connect(self.db)
        ledger.executescript(SCHEMA)
        ledger.execute(INSERT, (2.0, "alice", "POST", "/v1/chat/completions", None, 200, 3, 4, "usage", 0.0, None,
                                1.0, None, 0, "chat"))
        ledger.commit()
        ledger.close()

    def run_usage(self, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k != "USAGE_DB"}
        return subprocess.run([USAGE, *argv], capture_output=True, text=True, cwd=self.elsewhere,
                              env={**environ, **env}, timeout=60, check=False)

    def test_installed_as_a_command_reading_usage_db(self) -> None:
        done = self.run_usage("--json", USAGE_DB=self.db)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual([(r["user"], r["total_tokens"]) for r in json.loads(done.stdout)], [("alice", 7)])
        done = self.run_usage("--db", self.db, "--csv", USAGE_DB="/nowhere.sqlite3")  # --db wins
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("alice,1,3,4,7,0,0", done.stdout)

    def test_a_missing_ledger_is_named_with_its_full_path(self) -> None:
        done = self.run_usage()
        self.assertEqual(done.returncode, 1)
        self.assertEqual(done.stdout, "")
        where = os.path.join(self.elsewhere, "llmgw-usage.sqlite3")
        self.assertEqual(done.stderr, f"llmgw-usage: no ledger at {where} (from the default); give --db with the "
                                      "gateway's --usage-db, or set USAGE_DB\n")
        self.assertFalse(os.path.exists(where))  # looking did not create it
        done = self.run_usage(USAGE_DB="gone.sqlite3")
        self.assertIn(f"no ledger at {os.path.join(self.elsewhere, 'gone.sqlite3')} (from USAGE_DB)", done.stderr)
        done = self.run_usage(USAGE_DB="none")
        self.assertEqual((done.returncode, done.stderr),
                         (1, "llmgw-usage: the gateway keeps no ledger (USAGE_DB='none'); give --db\n"))

    def test_a_file_that_is_no_ledger(self) -> None:
        other = os.path.join(self.elsewhere, "notes.txt")
        with open(other, "w") as f:
            f.write("not a database")
        done = self.run_usage("--db", other)
        self.assertEqual(done.returncode, 1)
        self.assertIn(f"llmgw-usage: cannot read the ledger {other}: file is not a database", done.stderr)


class PrometheusTests(GatewayTestCase):
    async def test_exposition_parses_and_counts(self) -> None:
        await self.start(fake=FakeLlama(reactor, manual=True), max_concurrent=1)
        first = await self.chat(stream=True)
        queued = await self.chat(stream=True, key=BOB)
        await queued.body.wait_for(b": queue position=1")
        reply = await self.call("GET", "/metrics/prometheus", key=None)
        self.assertTrue((reply.header("Content-Type") or b"").startswith(b"text/plain"))
        families = {f.name: f for f in text_string_to_metric_families((await reply.text()).decode())}
        self.assertEqual(families["llmgw_queue_waiting"].samples[0].value, 1)
        self.assertEqual(families["llmgw_queue_active"].samples[0].value, 1)
        self.assertEqual(families["llmgw_queue_limit"].samples[0].value, 1)
        self.fake.release(2 * len(self.fake.reply))
        await first.text()
        await queued.text()
        await self.chat(stream=True, key="sk-alice-key", error_status=500)
        await settle()
        text = (await (await self.call("GET", "/metrics/prometheus", key=None)).text()).decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        self.assertEqual(samples[("llmgw_requests_total", (("user", "alice"),))], 2)
        self.assertEqual(samples[("llmgw_completion_tokens_total", (("user", "bob"),))], 8)
        self.assertEqual(samples[("llmgw_request_duration_seconds_count", ())], 3)
        self.assertEqual(samples[("llmgw_queue_wait_seconds_count", ())], 3)
        self.assertEqual(samples[("llmgw_time_to_first_token_seconds_count", ())], 2)
        self.assertEqual(samples[("llmgw_generation_tokens_per_second_count", ())], 2)
        self.assertEqual(samples[("llmgw_queue_waiting", ())], 0)

    async def test_upstream_errors_and_cancellations_by_kind(self) -> None:
        await self.start(upstream="http://127.0.0.1:1")
        await (await self.chat(stream=False)).text()
        text = (await (await self.call("GET", "/metrics/prometheus", key=None)).text()).decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        self.assertEqual(samples[("llmgw_upstream_errors_total", (("kind", "upstream_unreachable"),))], 1)


seconds = st.one_of(st.floats(min_value=0, max_value=1000), st.sampled_from([0.005, 0.01, 600.0, 1e9]))
records = st.builds(
    RequestRecord,
    user=st.sampled_from(["alice", "bob", "carol"]),
    method=st.sampled_from(["POST", "GET"]),
    path=st.just("/v1/chat/completions"),
    status=st.just(200),
    prompt_tokens=st.integers(0, 5000),
    completion_tokens=st.integers(0, 5000),
    duration=seconds,
    queue_wait=seconds,
    cancelled=st.booleans(),
    ttft=st.none() | seconds,
    tokens_per_second=st.none() | st.floats(min_value=0, max_value=5000),
    error=st.none() | st.sampled_from(["upstream_unreachable", "upstream_500", "idle_timeout", "queue_timeout"]),
)


def parsed(metrics: prometheus.PrometheusMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


class ExpositionTests(SynchronousTestCase):
    """What the exposition says follows from the requests observed."""

    @settings(max_examples=100, deadline=None)
    @given(st.lists(records, max_size=30))
    def test_counters_and_histograms_follow_the_records(self, recs: list[RequestRecord]) -> None:
        metrics = prometheus.PrometheusMetrics(Admission(Router.single(2), task.Clock(), 10, 60.0))
        for rec in recs:
            metrics.observe(rec)
        samples = parsed(metrics)
        for user in {r.user for r in recs}:
            mine = [r for r in recs if r.user == user]
            label = (("user", user),)
            self.assertEqual(samples[("llmgw_requests_total", label)], len(mine))
            self.assertEqual(samples[("llmgw_prompt_tokens_total", label)], sum(r.prompt_tokens for r in mine))
            self.assertEqual(samples[("llmgw_completion_tokens_total", label)],
                             sum(r.completion_tokens for r in mine))
            self.assertEqual(samples.get(("llmgw_cancelled_requests_total", label), 0), sum(r.cancelled for r in mine))
        for kind in ("upstream_unreachable", "upstream_500", "idle_timeout"):
            self.assertEqual(samples.get(("llmgw_upstream_errors_total", (("kind", kind),)), 0),
                             sum(r.error == kind for r in recs))
        self.assertNotIn(("llmgw_upstream_errors_total", (("kind", "queue_timeout"),)), samples)
        self.assertEqual(samples[("llmgw_request_duration_seconds_count", ())], len(recs))
        self.assertAlmostEqual(samples[("llmgw_request_duration_seconds_sum", ())], sum(r.duration for r in recs))
        self.assertEqual(samples[("llmgw_request_duration_seconds_bucket", (("le", "1.0"),))],
                         sum(r.duration <= 1.0 for r in recs))
        self.assertEqual(samples[("llmgw_queue_wait_seconds_count", ())], sum(r.method == "POST" for r in recs))
        self.assertEqual(samples[("llmgw_time_to_first_token_seconds_count", ())],
                         sum(r.ttft is not None for r in recs))

    def test_without_created_series(self) -> None:
        disable_created_metrics()
        self.addCleanup(enable_created_metrics)
        metrics = prometheus.PrometheusMetrics(Admission(Router.single(2), task.Clock(), 10, 60.0))
        metrics.observe(RequestRecord("alice", "POST", "/v1/x", 200, 3, 4, 0.5, ttft=0.1, tokens_per_second=40.0))
        self.assertNotIn(b"_created", generate_latest(metrics.registry))
        self.assertEqual(parsed(metrics)[("llmgw_requests_total", (("user", "alice"),))], 1)


class MetricsProtectionTests(GatewayTestCase):
    async def test_token(self) -> None:
        await self.start(metrics_token="m-secret")
        for path in ("/metrics", "/metrics/prometheus"):
            self.assertEqual((await self.call("GET", path, key=None)).code, 401)
            self.assertEqual((await self.call("GET", path, key="wrong")).code, 401)
            self.assertEqual((await self.call("GET", path, key=ALICE)).code, 401)
            ok = await self.call("GET", path, key="m-secret")
            self.assertEqual(ok.code, 200)
            await ok.text()
            # with the token, a request through a proxy is served too
            ok = await self.call("GET", path, key="m-secret", headers={"CF-Connecting-IP": ["203.0.113.9"]})
            self.assertEqual(ok.code, 200)
            await ok.text()

    async def test_loopback_only_unless_public(self) -> None:
        await self.start()
        app = self.gw.gateway.app
        for client, allowed in (("10.1.2.3", False), ("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True)):
            request = DummyRequest([b"metrics"])
            request.client = IPv4Address("TCP", client, 40000)
            if allowed:
                self.assertIn("queue", json.loads(app.metrics_json(request)))
            else:
                with self.assertRaises(GatewayError) as caught:
                    app.metrics_json(request)
                self.assertEqual(caught.exception.status, 403)
        app.public_metrics = True
        request = DummyRequest([b"metrics"])
        request.client = IPv4Address("TCP", "10.1.2.3", 40000)
        self.assertIn(b"llmgw_queue_limit", app.metrics_prometheus(request))

    async def test_networks_of_metrics_allow(self) -> None:
        await self.start(metrics_allow=parse_networks("10.0.0.0/8, fd00::/8 192.168.1.7"))
        app = self.gw.gateway.app
        cases = (("10.1.2.3", True), ("192.168.1.7", True), ("fd00::1", True), ("::ffff:10.9.9.9", True),
                 ("192.168.1.8", False), ("127.0.0.1", False), ("::1", False))
        for client, allowed in cases:
            request = DummyRequest([b"metrics"])
            request.client = (IPv6Address if ":" in client else IPv4Address)("TCP", client, 40000)
            if allowed:
                self.assertIn("queue", json.loads(app.metrics_json(request)), client)
            else:
                self.assertRaises(GatewayError, app.metrics_json, request)
        # this test's own loopback client is refused, with what to do about it
        reply = await self.call("GET", "/metrics", key=None)
        self.assertEqual(reply.code, 403)
        message = json.loads(await reply.text())["error"]["message"]
        self.assertIn("10.0.0.0/8, fd00::/8, 192.168.1.7/32", message)
        self.assertIn("not from 127.0.0.1", message)
        for option in ("--metrics-token", "--metrics-allow", "--public-metrics"):
            self.assertIn(option, message)

    async def test_a_request_through_a_proxy_is_not_let_in_by_address(self) -> None:
        # cloudflared (or nginx) on the gateway's machine connects from 127.0.0.1 for clients from anywhere
        await self.start()
        for header in ("X-Forwarded-For", "CF-Connecting-IP", "Forwarded"):
            reply = await self.call("GET", "/metrics", key=None, headers={header: ["203.0.113.9"]})
            self.assertEqual(reply.code, 403, header)
            self.assertIn("through a proxy", json.loads(await reply.text())["error"]["message"])
        reply = await self.call("GET", "/metrics", key=None)
        self.assertEqual(reply.code, 200)
        await reply.text()


class BooksTests(GatewayTestCase):
    """
    A request's books (totals, metrics, ledger, access line) are kept after its
    answer was written: on the clock's next turn, and at once when something
    reads them or the gateway stops.
    """

    async def start_recording(self, **config: Any) -> list[dict[str, Any]]:
        """A gateway, and the log events it writes."""
        await self.start(**config)
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return events

    @staticmethod
    def access(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in events if e.get("log_namespace") == "llmgw.access"]

    async def test_kept_on_the_next_turn_after_the_answer(self) -> None:
        clock = task.Clock()
        events = await self.start_recording(clock=clock)
        await (await self.chat(stream=False)).text()
        self.assertEqual(self.gw.gateway.accounting.totals.requests, 0)  # (the answer did not wait for them)
        self.assertEqual(self.access(events), [])
        clock.advance(0)
        self.assertEqual(self.gw.gateway.accounting.totals.requests, 1)
        self.assertEqual([e["user"] for e in self.access(events)], ["alice"])

    async def test_kept_before_they_are_read(self) -> None:
        await self.start_recording(clock=task.Clock())  # (its next turn never comes)
        await (await self.chat(stream=False)).text()
        self.assertEqual((await self.metrics())["users"]["alice"]["requests"], 1)
        await (await self.chat(stream=False)).text()
        exposition = (await (await self.call("GET", "/metrics/prometheus", key=None)).text()).decode()
        requests = {sample.labels["user"]: sample.value for family in text_string_to_metric_families(exposition)
                    for sample in family.samples if sample.name == "llmgw_requests_total"}
        self.assertEqual(requests, {"alice": 2.0})
        await (await self.chat(stream=False)).text()
        me = await (await self.call("GET", "/v1/gateway/me")).json()
        self.assertEqual(me["usage"]["requests"], 3, me)

    async def test_kept_when_the_gateway_stops(self) -> None:
        await self.start_recording(clock=task.Clock())
        await (await self.chat(stream=False)).text()
        await self.gw.stop()
        rows = sqlite3.connect(self.config.usage_db).execute("SELECT user, completion_tokens FROM requests").fetchall()
        self.assertEqual(rows, [("alice", 8)])

    async def test_access_lines_stay_in_order_with_a_refusal(self) -> None:
        events = await self.start_recording(clock=task.Clock())
        await (await self.chat(stream=False)).text()
        await (await self.call("GET", "/v1/models", key="sk-nobody")).text()
        self.assertEqual([e["status"] for e in self.access(events)], [200, 401])

    async def test_times_are_those_of_the_request_not_of_the_books(self) -> None:
        clock = task.Clock()
        clock.advance(1000)
        events = await self.start_recording(clock=clock)
        await (await self.chat(stream=False)).text()
        clock.advance(100)  # the books are kept a long while after the answer
        [line] = self.access(events)
        self.assertEqual(line["duration"], 0.0)


class JsonLogTests(GatewayTestCase):
    timeout = 60

    async def test_json_lines_with_access_fields(self) -> None:
        workdir, port = await self.prepare_subprocess(FakeLlama(reactor))
        proc = subprocess.Popen(
            [TWISTD, "--logger=twisted_gw.logs.json_stdout", "-n", "--pidfile=", "llmgw",
             "--listen", f"tcp:{port}:interface=127.0.0.1", "--upstream", self.fake.url],
            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.addCleanup(proc.kill)
        url = f"http://127.0.0.1:{port}"
        await self.wait_until_up(url)
        await (await self.call("POST", "/v1/chat/completions", chat_body(True), url=url)).text()
        await (await self.call("GET", "/v1/models", key="sk-nobody", url=url)).text()
        proc.send_signal(signal.SIGTERM)
        output, _ = await deferToThread(proc.communicate, timeout=30)
        events = [json.loads(line) for line in output.splitlines() if line.strip()]
        access = [e for e in events if e.get("log_namespace") == "llmgw.access"]
        self.assertEqual(len(access), 2, output)
        ok, refused = access
        for field, value in (("user", "alice"), ("method", "POST"), ("path", "/v1/chat/completions"),
                             ("status", 200), ("prompt_tokens", 7), ("completion_tokens", 8),
                             ("cancelled", False), ("model", "fake-llama")):
            self.assertEqual(ok[field], value, field)
        for field in ("queue_wait", "ttft", "duration"):
            self.assertIsInstance(ok[field], float)
        self.assertEqual((refused["status"], refused["user"], refused["error"]), (401, None, "invalid_api_key"))


class AccessLineTests(GatewayTestCase):
    async def test_the_text_line_of_each_request(self) -> None:
        await self.start()
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        await (await self.call("POST", "/v1/chat/completions", chat_body(False))).text()
        await (await self.call("GET", "/v1/{models}")).text()  # braces in the line are not format fields
        access = [e for e in events if e.get("log_namespace") == "llmgw.access"]
        for _ in range(100):  # (the books are kept on the reactor's turn after the answer)
            if len(access) == 2:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
            access = [e for e in events if e.get("log_namespace") == "llmgw.access"]
        lines = [eventAsText(e, includeTimestamp=False) for e in access]
        self.assertEqual(len(lines), 2, lines)
        self.assertRegex(lines[0], r"^\[llmgw\.access#info\] POST /v1/chat/completions 200 user=alice "
                                   r"wait=\d\.\d{3}s time=\d\.\d{3}s tokens=7\+8$")
        self.assertRegex(lines[1], r"^\[llmgw\.access#info\] GET /v1/\{models\} \d{3} user=alice wait=")


class KillTests(GatewayTestCase):
    timeout = 90

    async def test_sigkill_under_load_loses_at_most_the_last_second(self) -> None:
        db = os.path.abspath(self.mktemp()) + ".sqlite3"
        finished, killed = await self.kill_under_load(db)
        rows = sqlite3.connect(db).execute("SELECT finished_at FROM requests").fetchall()
        settled = [t for t in finished if t < killed - 1.0]
        self.assertGreater(len(settled), 20)
        self.assertGreaterEqual(len(rows), len(settled))
        self.assertLessEqual(len(rows), len(finished) + 6)
