"""Memory during and after a burst of requests (the triggers, with task.Clock; and the real hold and release)."""

from __future__ import annotations

import gc

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.proxy.memory import AfterBurst, give_back


class AfterBurstTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.calls: list[float] = []
        self.holds: list[int] = []
        self.in_flight = 0
        self.after = AfterBurst(self.clock, lambda: self.calls.append(self.clock.seconds()), burst=100, calm=1.0,
                                hold=lambda: self.holds.append(self.in_flight))

    def see(self, n: int) -> None:
        self.in_flight = n
        self.after.seen(n)

    def test_held_at_the_burst_and_each_time_it_grows_by_a_burst_more(self) -> None:
        for n in range(1, 351):
            self.see(n)
        for n in range(350, 0, -1):
            self.see(n)
        self.assertEqual(self.holds, [100, 200, 300])
        self.clock.advance(1)
        self.assertEqual(len(self.calls), 1)
        for n in range(1, 201):  # a new burst is held anew
            self.see(n)
        self.assertEqual(self.holds, [100, 200, 300, 100, 200])

    def test_released_once_after_a_burst_and_a_calm_second(self) -> None:
        for n in range(1, 101):
            self.after.seen(n)
        for n in range(99, 10, -1):
            self.after.seen(n)
        self.clock.advance(5)
        self.assertEqual(self.calls, [])  # 11 still in flight: not over yet
        self.after.seen(10)  # a tenth of the burst
        self.clock.advance(0.9)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.calls, [6.0])
        self.after.seen(50)
        self.after.seen(0)
        self.clock.advance(5)
        self.assertEqual(self.calls, [6.0])  # no new burst, nothing more

    def test_not_while_requests_come_and_go(self) -> None:
        self.after.seen(100)
        self.after.seen(0)
        self.clock.advance(0.5)
        self.after.seen(11)  # more come: the calm starts again when they are done
        self.clock.advance(2)
        self.assertEqual(self.calls, [])
        self.after.seen(0)
        self.clock.advance(1)
        self.assertEqual(len(self.calls), 1)

    def test_small_loads_never_pay_for_it(self) -> None:
        for _ in range(1000):
            self.after.seen(99)
            self.after.seen(0)
        self.clock.advance(10)
        self.assertEqual(self.calls, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels(self) -> None:
        self.after.seen(100)
        self.after.seen(0)
        self.after.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_give_back_collects_cycles(self) -> None:
        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        gc.disable()
        try:
            del a, b
            before = sum(1 for o in gc.get_objects() if isinstance(o, Node))
            give_back()
            after = sum(1 for o in gc.get_objects() if isinstance(o, Node))
        finally:
            gc.enable()
        self.assertEqual((before, after), (2, 0))

    def test_what_is_held_is_left_out_until_given_back(self) -> None:
        from twisted_gw.proxy.memory import hold

        frozen = gc.get_freeze_count()
        hold()
        self.assertGreater(gc.get_freeze_count(), frozen)
        give_back()
        self.assertEqual(gc.get_freeze_count(), 0)
