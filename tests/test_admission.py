"""The admission queue: positions, release, cancellation."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_gw.admission import Admission, Ticket


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
