"""Totals and rolling windows, driven by a fake clock."""

from __future__ import annotations

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.admission import Admission
from twisted_gw.books.accounting import Accounting, UserTotals
from twisted_gw.books.metrics import snapshot
from twisted_gw.books.record import RequestRecord


def record(user: str, prompt: int, completion: int, duration: float) -> RequestRecord:
    return RequestRecord(user, "POST", "/v1/chat/completions", 200, prompt, completion, duration)


class AccountingTests(SynchronousTestCase):
    def test_totals_and_windows(self) -> None:
        clock = Clock()
        clock.advance(1000)
        accounting = Accounting(clock)
        accounting.record(record("alice", 10, 60, 2.0))
        clock.advance(90)
        accounting.record(record("bob", 5, 30, 4.0))
        self.assertEqual(accounting.tokens_per_second(60), 30 / 60)
        self.assertEqual(accounting.tokens_per_second(300), 90 / 300)
        self.assertEqual(accounting.average_response_time(), 3.0)
        clock.advance(250)  # alice's request is now older than five minutes
        self.assertEqual(accounting.tokens_per_second(300), 30 / 300)
        self.assertEqual(accounting.tokens_per_second(60), 0)
        self.assertEqual(accounting.average_response_time(), 4.0)
        clock.advance(100)
        self.assertEqual(accounting.average_response_time(), 0.0)
        self.assertEqual(accounting.totals.requests, 2)
        self.assertEqual(accounting.totals.completion_tokens, 90)
        self.assertEqual(accounting.users["alice"].prompt_tokens, 10)

    def test_snapshot(self) -> None:
        clock = Clock()
        accounting = Accounting(clock)
        admission = Admission(2, clock)
        admission.acquire()
        accounting.record(record("alice", 7, 3, 1.0))
        doc = snapshot(admission, accounting)
        self.assertEqual(doc["queue"], {"waiting": 0, "active": 1, "depth": 1, "max_concurrent": 2})
        self.assertEqual(doc["totals"], {"requests": 1, "tokens": 3, "prompt_tokens": 7, "completion_tokens": 3,
                                         "cancelled": 0})
        self.assertEqual(doc["per_user_tokens"], {"alice": 3})
        self.assertEqual(doc["users"], {"alice": {"requests": 1, "prompt_tokens": 7, "completion_tokens": 3,
                                                    "cancelled": 0}})
        self.assertEqual(doc["throughput"], {"tokens_per_second_1m": 0.05, "tokens_per_second_5m": 0.01})
        self.assertEqual(doc["latency"], {"avg_response_time_s": 1.0, "p50_response_time_s": 1.0,
                                          "p95_response_time_s": 1.0, "p50_ttft_s": None, "p95_ttft_s": None})

    def test_percentiles_over_five_minutes(self) -> None:
        clock = Clock()
        accounting = Accounting(clock)
        for i in range(1, 21):
            accounting.record(RequestRecord("a", "POST", "/v1/x", 200, 1, 1, float(i), ttft=i / 10))
        p = accounting.percentiles()
        self.assertEqual(p, {"p50_response_time_s": 10.0, "p95_response_time_s": 19.0,
                             "p50_ttft_s": 1.0, "p95_ttft_s": 1.9})
        clock.advance(301)
        self.assertEqual(accounting.percentiles()["p95_response_time_s"], None)

    def test_latency_is_of_generations_only(self) -> None:
        """Item 4 of the operations issue: twenty fast model lists made the dashboard say p50 0.001 s."""
        accounting = Accounting(Clock())
        for _ in range(20):
            accounting.record(RequestRecord("a", "GET", "/v1/models", 200, 0, 0, 0.001, ttft=0.001))
        accounting.record(RequestRecord("a", "POST", "/v1/chat/completions", 200, 5, 9, 4.0, ttft=0.5))
        self.assertEqual(accounting.percentiles(), {"p50_response_time_s": 4.0, "p95_response_time_s": 4.0,
                                                    "p50_ttft_s": 0.5, "p95_ttft_s": 0.5})
        self.assertEqual(accounting.average_response_time(), 4.0)
        self.assertEqual(accounting.totals.requests, 21)  # (counted all the same)

    def test_a_burst_expires_and_is_compacted(self) -> None:
        clock = Clock()
        accounting = Accounting(clock)
        for i in range(2000):  # a burst: 2000 requests in 20 s, every tenth without a first token
            clock.advance(0.01)
            rec = record("alice", 1, 2, duration=float(i % 100))
            accounting.record(rec if i % 10 else attrs.evolve(rec, ttft=0.5))
        self.assertEqual(accounting.tokens_per_second(300), 4000 / 300)
        self.assertEqual(accounting.percentiles()["p50_ttft_s"], 0.5)
        self.assertEqual(accounting.percentiles()["p95_response_time_s"], 94.0)
        clock.advance(290)  # the first half is now older than five minutes
        self.assertEqual(accounting.tokens_per_second(300), 2000 / 300)
        self.assertAlmostEqual(accounting.average_response_time(), 49.5)
        clock.advance(10)  # all of the burst is
        accounting.record(record("bob", 1, 1, 1.0))
        self.assertLess(len(accounting._recent.at), 10)  # what expired was let go
        self.assertEqual(accounting.average_response_time(), 1.0)
        clock.advance(301)
        self.assertEqual(accounting.average_response_time(), 0.0)
        self.assertEqual(accounting.percentiles()["p50_ttft_s"], None)

    def test_restore(self) -> None:
        accounting = Accounting(Clock())
        accounting.restore({"alice": UserTotals(3, 30, 60, 1)})
        accounting.record(record("alice", 1, 2, 1.0))
        self.assertEqual(accounting.users["alice"], UserTotals(4, 31, 62, 1))
        self.assertEqual(accounting.totals, UserTotals(4, 31, 62, 1))
