"""One timer for the keepalives of every waiting stream."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.admission.keepalive import Keepalives


class KeepalivesTests(SynchronousTestCase):
    def test_each_stream_every_interval_from_its_arrival(self) -> None:
        clock = Clock()
        keepalives = Keepalives(clock, 15.0)
        written: list[tuple[str, float]] = []
        keepalives.add("a", lambda: written.append(("a", clock.seconds())))
        clock.advance(5)
        keepalives.add("b", lambda: written.append(("b", clock.seconds())))
        for _ in range(390):  # to 44 s
            clock.advance(0.1)
        self.assertEqual([(k, round(t, 1)) for k, t in written], [("a", 15.0), ("b", 20.0), ("a", 30.0), ("b", 35.0)])

    def test_a_burst_is_spread_over_ticks_and_one_timer_serves_all(self) -> None:
        clock = Clock()
        keepalives = Keepalives(clock, 15.0, tick=0.1, per_tick=100)
        counts: list[int] = []
        written = 0

        def write() -> None:
            nonlocal written
            written += 1

        for i in range(1000):
            keepalives.add(i, write)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(15.0)
        self.assertEqual(written, 100)
        for _ in range(12):
            before = written
            clock.advance(0.1)
            counts.append(written - before)
        self.assertEqual(counts, [100] * 9 + [0] * 3)  # never more than per_tick in one reactor turn
        self.assertEqual(written, 1000)

    def test_discarded_streams_get_nothing_and_the_timer_stops(self) -> None:
        clock = Clock()
        keepalives = Keepalives(clock, 1.0)
        written: list[str] = []
        keepalives.add("a", lambda: written.append("a"))
        keepalives.add("b", lambda: written.append("b"))
        keepalives.discard("a")
        clock.advance(1.0)
        self.assertEqual(written, ["b"])
        keepalives.discard("b")
        self.assertEqual((len(keepalives), clock.getDelayedCalls()), (0, []))
        keepalives.discard("b")  # twice is harmless
