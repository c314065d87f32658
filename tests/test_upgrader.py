"""
The upgrade state machine, driven by a L{Clock} and a fake child.
"""

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from twisted_graceful import upgrader as U


class FakeChild:
    def __init__(self, pid, on_ready, on_failed):
        self.pid = pid
        self.on_ready = on_ready
        self.on_failed = on_failed
        self.killed = False
        self.tail = ["Traceback (most recent call last):", "ImportError: no module named x"]

    def kill(self):
        self.killed = True

    def output_tail(self):
        return list(self.tail)


class UpgraderTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.children = []
        self.handed_over = []
        self.events = []
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.upgrader = U.Upgrader(
            self.clock, self.start_child, self.handed_over.append, generation=1,
            ready_timeout=30, backoff_base=1.0, backoff_max=8.0,
            observers=[lambda event, **kw: self.events.append(event)],
        )

    def start_child(self, on_ready, on_failed):
        child = FakeChild(1000 + len(self.children), on_ready, on_failed)
        self.children.append(child)
        return child

    def messages(self):
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.logged]

    def test_sighup_starts_one_child(self):
        self.assertEqual(self.upgrader.request_upgrade(), "started")
        self.assertEqual(self.upgrader.state, U.UPGRADING)
        self.assertEqual(len(self.children), 1)
        self.assertEqual(self.events, ["started"])

    def test_second_request_during_upgrade_is_refused_with_reason(self):
        self.upgrader.request_upgrade()
        self.assertEqual(self.upgrader.request_upgrade(), "refused")
        self.assertEqual(len(self.children), 1)
        self.assertTrue(any("already in progress" in m and "pid 1000" in m for m in self.messages()))

    def test_ready_hands_over_and_refuses_further_upgrades(self):
        self.upgrader.request_upgrade()
        self.clock.advance(0.25)
        self.children[0].on_ready(1000)
        self.assertEqual(self.handed_over, [1000])
        self.assertEqual(self.upgrader.state, U.HANDED_OVER)
        self.assertEqual(self.upgrader.last_outcome.result, "ok")
        self.assertEqual(self.upgrader.last_outcome.duration, 0.25)
        self.assertEqual(self.upgrader.request_upgrade(), "refused")
        self.assertTrue(any("draining" in m for m in self.messages()))
        # The ready timeout no longer fires.
        self.clock.advance(60)
        self.assertFalse(self.children[0].killed)

    def test_failed_child_changes_nothing_but_the_backoff(self):
        self.upgrader.request_upgrade()
        self.children[0].on_failed("exited with status 1")
        self.assertEqual(self.upgrader.state, U.SERVING)
        self.assertEqual(self.handed_over, [])
        outcome = self.upgrader.last_outcome
        self.assertEqual(outcome.result, "failed")
        self.assertEqual(outcome.child_pid, 1000)
        self.assertIn("pid 1000 exited with status 1", outcome.error)
        text = "\n".join(self.messages())
        self.assertIn("Upgrade failed: pid 1000 exited with status 1 before it was ready", text)
        self.assertIn("ImportError: no module named x", text)

    def test_timeout_kills_child(self):
        self.upgrader.request_upgrade()
        self.clock.advance(29.9)
        self.assertFalse(self.children[0].killed)
        self.clock.advance(0.1)
        self.assertTrue(self.children[0].killed)
        self.assertEqual(self.upgrader.state, U.SERVING)
        self.assertEqual(self.upgrader.last_outcome.result, "timeout")
        self.assertIn("not ready within 30 s", self.upgrader.last_outcome.error)

    def test_late_ready_after_timeout_is_ignored(self):
        self.upgrader.request_upgrade()
        self.clock.advance(30)
        self.children[0].on_ready(1000)
        self.assertEqual(self.handed_over, [])

    def test_backoff_doubles_and_schedules_one_attempt(self):
        self.upgrader.request_upgrade()
        self.children[0].on_failed("exited with status 1")  # backoff 1 s
        self.assertEqual(self.upgrader.request_upgrade(), "scheduled")
        self.assertEqual(self.upgrader.request_upgrade(), "scheduled")
        self.assertTrue(any("next attempt will run in 1.0 s" in m for m in self.messages()))
        self.assertTrue(any("already scheduled" in m for m in self.messages()))
        self.assertEqual(len(self.children), 1)
        self.clock.advance(1.0)
        self.assertEqual(len(self.children), 2)
        self.children[1].on_failed("exited with status 1")  # backoff 2 s
        self.clock.advance(1.5)
        self.assertEqual(self.upgrader.request_upgrade(), "scheduled")
        self.clock.advance(0.5)
        self.assertEqual(len(self.children), 3)

    def test_backoff_is_capped(self):
        for i in range(6):
            self.clock.advance(100)
            self.upgrader.request_upgrade()
            self.children[-1].on_failed("exited with status 1")
        self.assertEqual(self.upgrader.next_attempt_at - self.clock.seconds(), 8.0)

    def test_success_resets_backoff(self):
        self.upgrader.request_upgrade()
        self.children[0].on_failed("exited with status 1")
        self.clock.advance(1)
        self.upgrader.request_upgrade()
        self.children[1].on_ready(1001)
        self.assertEqual(self.upgrader.failures, 0)
        self.assertIsNone(self.upgrader.next_attempt_at)

    def test_spawn_error_is_a_failed_upgrade(self):
        def broken(on_ready, on_failed):
            raise OSError("No such file or directory: '/usr/bin/python9'")

        self.upgrader._start_child = broken
        self.upgrader.request_upgrade()
        self.assertEqual(self.upgrader.state, U.SERVING)
        self.assertIn("could not be spawned", self.upgrader.last_outcome.error)

    def test_shutdown_during_upgrade_kills_unready_child(self):
        self.upgrader.request_upgrade()
        self.upgrader.shutting_down()
        self.assertTrue(self.children[0].killed)
        self.assertEqual(self.upgrader.state, U.SHUTTING_DOWN)
        self.children[0].on_failed("was killed by SIGKILL")
        self.assertEqual(self.upgrader.failures, 0)
        self.assertEqual(self.upgrader.request_upgrade(), "refused")

    def test_shutdown_cancels_scheduled_attempt(self):
        self.upgrader.request_upgrade()
        self.children[0].on_failed("exited with status 1")
        self.upgrader.request_upgrade()
        self.upgrader.shutting_down()
        self.clock.advance(10)
        self.assertEqual(len(self.children), 1)
