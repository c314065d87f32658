"""
The drain tracker with fake connections and a L{Clock}.
"""

from twisted.internet.task import Clock
from twisted.trial import unittest

from twisted_graceful.drain import CONNECTION, TRANSACTION, DrainableConnection, DrainTracker


class FakeTransport:
    def __init__(self):
        self.aborted = False

    def abortConnection(self):
        self.aborted = True

    def getPeer(self):
        return "peer"


class FakeConnection(DrainableConnection):
    protocol_name = "fake"

    def __init__(self, tracker, busy=False):
        self.transport = FakeTransport()
        self.busy = busy
        self.asked = []
        self.track(tracker)

    def in_transaction(self):
        return self.busy

    def close_at_boundary(self, idle_grace):
        self.asked.append(idle_grace)
        if not self.busy:
            self.untrack()

    def finish_transaction(self):
        self.busy = False
        if self.asked:
            self.untrack()


class DrainTrackerTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.tracker = DrainTracker(self.clock, idle_grace=1.0, progress_interval=5.0,
                                    clock=self.clock.seconds)

    def drain(self, **kw):
        results = []
        self.tracker.drain(**kw).addCallback(results.append)
        return results

    def test_counts_by_protocol_and_transaction(self):
        FakeConnection(self.tracker)
        FakeConnection(self.tracker, busy=True)
        self.assertEqual(self.tracker.counts(), {"fake": (2, 1)})

    def test_empty_drain_finishes_at_once(self):
        results = self.drain()
        self.assertEqual(len(results), 1)
        self.assertEqual(results[0].at_start, 0)

    def test_transaction_mode_closes_idle_and_waits_for_busy(self):
        idle = FakeConnection(self.tracker)
        busy = FakeConnection(self.tracker, busy=True)
        results = self.drain(mode=TRANSACTION, timeout=60, abort_grace=5)
        self.assertEqual(idle.asked, [1.0])
        self.assertEqual(busy.asked, [1.0])
        self.assertEqual(results, [])
        self.clock.advance(3)
        busy.finish_transaction()
        self.assertEqual(len(results), 1)
        report = results[0]
        self.assertEqual((report.at_start, report.busy_at_start), (2, 1))
        self.assertEqual(report.closed_by_server, 2)
        self.assertEqual(report.cut, [])
        self.assertEqual(report.duration, 3)

    def test_connection_accepted_during_drain_is_closed_too(self):
        results = self.drain(mode=TRANSACTION)
        self.assertEqual(len(results), 1)
        late = FakeConnection(self.tracker, busy=True)
        self.assertEqual(late.asked, [1.0])

    def test_connection_mode_leaves_connections_until_the_timeout(self):
        conn = FakeConnection(self.tracker, busy=True)
        results = self.drain(mode=CONNECTION, timeout=10, abort_grace=5)
        self.assertEqual(conn.asked, [])
        self.clock.advance(10)
        self.assertEqual(conn.asked, [0])  # at the deadline: close at the next boundary
        conn.finish_transaction()
        self.assertEqual(results[0].closed_by_server, 1)

    def test_client_closing_is_counted(self):
        conn = FakeConnection(self.tracker, busy=True)
        results = self.drain(mode=CONNECTION, timeout=10)
        conn.untrack()
        self.assertEqual(results[0].closed_by_client, 1)

    def test_hard_deadline_aborts_and_reports(self):
        conn = FakeConnection(self.tracker, busy=True)
        results = self.drain(mode=TRANSACTION, timeout=10, abort_grace=5)
        self.clock.advance(10)
        self.clock.advance(4.9)
        self.assertFalse(conn.transport.aborted)
        self.clock.advance(0.1)
        self.assertTrue(conn.transport.aborted)
        self.assertEqual(len(results), 1)
        self.assertEqual(len(results[0].cut), 1)
        self.assertIn("in a transaction", results[0].cut[0])
        self.assertIn("1 cut at the deadline", results[0].summary())

    def test_hard_deadline_waits_for_a_commit_reply(self):
        """
        A connection whose commit is being written is not cut: the drain ends
        when it closes after its reply.
        """
        conn = FakeConnection(self.tracker, busy=True)
        conn.abort_connection = lambda: False
        results = self.drain(mode=TRANSACTION, timeout=10, abort_grace=5)
        self.clock.advance(10)
        self.clock.advance(5)
        self.assertEqual(results, [])
        self.assertFalse(conn.transport.aborted)
        conn.untrack()  # the reply went out, the connection closed
        self.assertEqual(len(results), 1)
        self.assertEqual(results[0].cut, [])

    def test_waiting_for_a_commit_reply_is_bounded(self):
        from twisted_graceful.drain import COMMIT_REPLY_WAIT

        conn = FakeConnection(self.tracker, busy=True)
        conn.abort_connection = lambda: False
        results = self.drain(mode=TRANSACTION, timeout=10, abort_grace=5)
        self.clock.advance(10)
        self.clock.advance(5)
        self.clock.advance(COMMIT_REPLY_WAIT)
        self.assertTrue(conn.transport.aborted)
        self.assertEqual(len(results[0].cut), 1)

    def test_resume_calls_the_drain_off(self):
        conn = FakeConnection(self.tracker, busy=True)
        results = self.drain(mode=TRANSACTION, timeout=10, abort_grace=5)
        self.assertTrue(self.tracker.resume())
        self.assertFalse(self.tracker.draining)
        late = FakeConnection(self.tracker)
        self.assertEqual(late.asked, [])  # served, not closed
        self.clock.advance(100)
        self.assertFalse(conn.transport.aborted)  # no deadline any more
        conn.finish_transaction()
        self.assertEqual(results, [])
        self.assertFalse(self.tracker.resume())  # nothing to call off

    def test_drain_twice_returns_the_same_result(self):
        FakeConnection(self.tracker, busy=True).busy = True
        first, second = self.drain(), self.drain()
        self.assertEqual((first, second), ([], []))

    def test_bad_mode(self):
        self.assertRaises(ValueError, self.tracker.drain, mode="eventually")

    def test_listeners_hear_changes(self):
        seen = []
        self.tracker.add_change_callback(lambda t: seen.append(len(t)))
        conn = FakeConnection(self.tracker)
        conn.untrack()
        self.assertEqual(seen, [1, 0])
