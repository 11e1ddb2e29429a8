"""The admission queue: positions, release, cancellation."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.admission import Admission, QueueTimeout, Ticket


class AdmissionTests(SynchronousTestCase):
    def test_free_place_is_granted_at_once_without_a_position(self) -> None:
        admission = Admission(2, Clock())
        told: list[int] = []
        ticket = self.successResultOf(admission.acquire(told.append))
        self.assertFalse(ticket.waited)
        self.assertEqual(told, [])
        self.assertEqual((admission.active, admission.waiting), (1, 0))

    def test_positions_are_told_and_updated(self) -> None:
        admission = Admission(1, Clock())
        running = self.successResultOf(admission.acquire())
        told: dict[str, list[int]] = {"a": [], "b": [], "c": []}
        ds = {name: admission.acquire(told[name].append) for name in "abc"}
        self.assertEqual(told, {"a": [1], "b": [2], "c": [3]})
        self.assertEqual(admission.waiting, 3)
        running.release()
        a = self.successResultOf(ds["a"])
        self.assertTrue(a.waited)
        self.assertEqual(told, {"a": [1], "b": [2, 1], "c": [3, 2]})
        a.release()
        self.assertEqual(told["c"], [3, 2, 1])
        self.assertEqual((admission.active, admission.waiting), (1, 1))
        self.successResultOf(ds["b"]).release()
        self.successResultOf(ds["c"]).release()
        self.assertEqual((admission.active, admission.waiting), (0, 0))

    def test_cancelled_waiter_leaves_and_others_move_up(self) -> None:
        admission = Admission(1, Clock())
        running = self.successResultOf(admission.acquire())
        told_b: list[int] = []
        a = admission.acquire()
        b = admission.acquire(told_b.append)
        a.cancel()
        self.failureResultOf(a, CancelledError)
        self.assertEqual(told_b, [2, 1])
        self.assertEqual(admission.waiting, 1)
        running.release()
        self.successResultOf(b).release()
        self.assertEqual((admission.active, admission.waiting, admission.free), (0, 0, 1))

    def test_release_is_counted_once(self) -> None:
        admission = Admission(1, Clock())
        ticket: Ticket = self.successResultOf(admission.acquire())
        ticket.release()
        ticket.release()
        self.assertEqual(admission.free, 1)
        self.assertEqual(admission.active, 0)

    def test_never_more_than_the_limit(self) -> None:
        admission = Admission(3, Clock())
        ds = [admission.acquire() for _ in range(10)]
        self.assertEqual(sum(1 for d in ds if d.called), 3)
        self.assertEqual((admission.active, admission.waiting), (3, 7))
        for d in ds:
            self.successResultOf(d).release()
        self.assertEqual((admission.active, admission.waiting), (0, 0))


class PositionPassesTests(SynchronousTestCase):
    def test_changes_within_the_interval_are_told_together(self) -> None:
        clock = Clock()
        admission = Admission(1, clock, position_interval=1.0)
        running = self.successResultOf(admission.acquire())
        told: dict[int, list[int]] = {i: [] for i in range(5)}
        ds = [admission.acquire(told[i].append) for i in range(5)]
        self.assertEqual(told[0], [1])  # the first pass is at once
        self.assertEqual([told[i] for i in range(1, 5)], [[], [], [], []])  # the rest wait for the next
        clock.advance(1)
        self.assertEqual([told[i] for i in range(5)], [[1], [2], [3], [4], [5]])
        for d in ds[:2]:
            d.cancel()
            self.failureResultOf(d, CancelledError)
        running.release()  # the waiter at 3 runs; two passes' worth of changes...
        self.assertTrue(ds[2].called)
        self.assertEqual([told[i] for i in (3, 4)], [[4], [5]])  # ...within a second of the last pass
        clock.advance(0.5)
        self.assertEqual([told[i] for i in (3, 4)], [[4], [5]])
        clock.advance(0.5)
        self.assertEqual([told[i] for i in (3, 4)], [[4, 1], [5, 2]])  # told once, the latest
        # only the queue timeout is left: one timer, for the earliest waiter
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [600])


class QueueTimeoutTests(SynchronousTestCase):
    def test_each_waiter_times_out_at_its_own_deadline(self) -> None:
        clock = Clock()
        admission = Admission(1, clock, queue_timeout=10)
        running = self.successResultOf(admission.acquire())
        first = admission.acquire()
        clock.advance(3)
        gone = admission.acquire()
        clock.advance(1)
        second = admission.acquire()
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        clock.advance(5.9)
        self.assertNoResult(first)
        clock.advance(0.1)  # t=10: the first waiter's time is up
        self.failureResultOf(first, QueueTimeout)
        self.assertNoResult(second)
        clock.advance(3.9)
        self.assertNoResult(second)
        clock.advance(0.1)  # t=14
        self.failureResultOf(second, QueueTimeout)
        self.assertEqual(clock.getDelayedCalls(), [])
        running.release()

    def test_a_served_waiter_does_not_time_out(self) -> None:
        clock = Clock()
        admission = Admission(1, clock, queue_timeout=10)
        running = self.successResultOf(admission.acquire())
        served = admission.acquire()
        later = admission.acquire()
        clock.advance(5)
        running.release()
        ticket = self.successResultOf(served)
        clock.advance(5)
        self.failureResultOf(later, QueueTimeout)
        self.assertFalse(ticket.released)

    def test_the_deadlines_of_those_who_left_are_let_go(self) -> None:
        clock = Clock()
        admission = Admission(1, clock, max_queue=10_000, queue_timeout=600)
        self.successResultOf(admission.acquire())
        for _ in range(1000):
            d = admission.acquire(lambda n: None)
            d.cancel()
            self.failureResultOf(d, CancelledError)
        staying = admission.acquire()
        self.assertLess(len(admission._deadlines), 100)
        self.assertEqual(admission.waiting, 1)
        clock.advance(600)
        self.failureResultOf(staying, QueueTimeout)
