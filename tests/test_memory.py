"""Memory given back once a burst of requests is over (the trigger, with task.Clock; and the real release)."""

from __future__ import annotations

import gc

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.proxy.memory import AfterBurst, give_back


class AfterBurstTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.calls: list[float] = []
        self.after = AfterBurst(self.clock, lambda: self.calls.append(self.clock.seconds()), burst=100, calm=1.0)

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
