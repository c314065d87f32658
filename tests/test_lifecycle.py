"""
The lifecycle of a generation and the lineage record, driven by a L{Clock},
fake children and fake ports, with a real lineage record (a memfd) and a
real pidfile: every transition, every refusal, and the races between a
generation, its successor and its successor's successor.
"""

import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from twisted_graceful import lifecycle as LC
from twisted_graceful import lineage as L
from twisted_graceful.drain import DrainTracker
from twisted_graceful.pidfile import read_pid

from tests.test_drain import FakeConnection

PARENT = 100


class FakeChild:
    """
    What L{NextGenerationProcess} is to the lifecycle: a pid, kill(), the
    tail of its output, and whether it has finished.
    """

    def __init__(self, pid):
        self.pid = pid
        self.killed = False
        self.finished = False
        self.ended = defer.Deferred()
        self.tail = ["Traceback (most recent call last):", "ImportError: no module named x"]

    def kill(self):
        self.killed = True

    def output_tail(self):
        return list(self.tail)


class FakePorts:
    def __init__(self):
        self.accepting = False
        self.closed = False
        self.history = []

    def pause(self):
        self.accepting = False
        self.history.append("pause")

    def resume(self):
        assert not self.closed, "resumed a closed port"
        self.accepting = True
        self.history.append("resume")

    def close(self):
        self.accepting = False
        self.closed = True
        self.history.append("close")


class LifecycleTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pidfile = os.path.join(self.dir, "twistd.pid")
        self.lineage = L.Lineage.create(self.pidfile)
        self.addCleanup(self.lineage.close)
        self.children = []
        self.events = []
        self.exits = []
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.ports = FakePorts()
        self.tracker = DrainTracker(self.clock, idle_grace=0.5, progress_interval=0)
        self.life = self.make(PARENT, self.ports, self.tracker)

    def make(self, pid, ports, tracker, generation=1):
        life = LC.Lifecycle(
            self.clock, lineage=self.lineage, ports=ports, tracker=tracker,
            spawn=self.spawn, generation=generation, pid=pid, ready_timeout=30,
            drain_timeout=10, abort_grace=2, backoff_base=1.0, backoff_max=8.0,
            exit=lambda: self.exits.append(pid))
        life.observers.append(lambda event, **kw: self.events.append((pid, event, kw)))
        return life

    def spawn(self, lifecycle):
        child = FakeChild(1000 + len(self.children))
        self.children.append(child)
        return child

    def names(self, pid=PARENT):
        return [event for who, event, _ in self.events if who == pid]

    def messages(self):
        return [formatEvent(e) for e in self.logged]

    def serve(self):
        """
        The first generation: serving, current in the lineage record.
        """
        self.lineage.begin(PARENT, 1)
        self.ports.resume()
        self.life.ready("bound")

    def upgrade_to_ready_child(self, delay=0.25):
        """
        A HUP, then the child takes over (as the child's own code does) and
        says READY.
        """
        self.assertEqual(self.life.request_upgrade(), "started")
        child = self.children[-1]
        self.clock.advance(delay)
        self.assertIsNone(self.lineage.take_over(PARENT, child.pid, 2))
        self.life.child_ready(child)
        return child


class TransitionTableTests(unittest.SynchronousTestCase):
    def test_every_state_is_reachable_and_exited_is_final(self):
        reached = {LC.STARTING} | set(LC.TRANSITIONS.values())
        self.assertEqual(reached, set(LC.STATES))
        self.assertFalse([key for key in LC.TRANSITIONS if key[0] == LC.EXITED])

    def test_refusals_are_sentences_for_events_that_cannot_happen(self):
        for (state, event), reason in LC.REFUSALS.items():
            self.assertNotIn((state, event), LC.TRANSITIONS)
            self.assertTrue(reason[0].islower() and len(reason.split()) >= 3, reason)

    def test_upgrade_is_allowed_only_while_serving(self):
        for state in LC.STATES:
            allowed = (state, "upgrade") in LC.TRANSITIONS
            self.assertEqual(allowed, state == LC.SERVING, state)


class StartTests(LifecycleTestCase):
    def test_first_generation_serves(self):
        self.serve()
        self.assertEqual(self.life.state, LC.SERVING)
        self.assertEqual(self.lineage.read()["current"], PARENT)
        _, event, payload = self.events[-1]
        self.assertEqual(event, "serving")
        self.assertEqual((payload["pid"], payload["generation"], payload["state"],
                          payload["source"]), (PARENT, 1, "serving", "bound"))

    def test_upgrade_refused_while_starting(self):
        self.assertEqual(self.life.request_upgrade("SIGHUP"), "refused")
        self.assertEqual(self.children, [])
        self.assertTrue(any("SIGHUP ignored: this generation is not serving yet" in m
                            for m in self.messages()))

    def test_illegal_transition_is_a_bug(self):
        self.assertRaises(LC.IllegalTransition, self.life._move, "drained")
        self.assertEqual(self.life.state, LC.STARTING)


class UpgradeTests(LifecycleTestCase):
    def setUp(self):
        LifecycleTestCase.setUp(self)
        self.serve()

    def test_sighup_starts_one_child_the_lineage_expects(self):
        self.assertEqual(self.life.request_upgrade(), "started")
        self.assertEqual(self.life.state, LC.UPGRADING)
        self.assertEqual(self.lineage.read()["pending"], 1000)
        self.assertEqual(self.names()[-2:], ["upgrade-started", "upgrade-requested"])
        self.assertTrue(self.ports.accepting)

    def test_second_request_during_upgrade_is_refused_with_reason(self):
        self.life.request_upgrade()
        self.assertEqual(self.life.request_upgrade(), "refused")
        self.assertEqual(len(self.children), 1)
        self.assertTrue(any("already in progress" in m and "pid 1000" in m
                            for m in self.messages()))

    def test_ready_child_gets_the_listeners(self):
        conn = FakeConnection(self.tracker, busy=True)
        child = self.upgrade_to_ready_child()
        self.assertEqual(self.life.state, LC.DRAINING)
        self.assertFalse(self.ports.accepting)
        self.assertFalse(self.ports.closed)  # kept for a take-back
        self.assertEqual(read_pid(self.pidfile), child.pid)  # written by the child's take-over
        self.assertEqual(self.life.last_outcome.result, "ok")
        self.assertEqual(self.life.last_outcome.duration, 0.25)
        self.assertEqual(self.names()[-2:], ["upgrade-ok", "handed-over"])
        self.assertEqual(self.exits, [])
        conn.finish_transaction()
        self.assertEqual(self.names()[-1], "drained")
        self.assertEqual(self.exits, [PARENT])  # nothing to drain
        self.assertEqual(self.life.state, LC.EXITED)
        self.assertTrue(self.ports.closed)

    def test_draining_generation_refuses_upgrades(self):
        FakeConnection(self.tracker, busy=True)
        child = self.upgrade_to_ready_child()
        self.assertEqual(self.life.request_upgrade(), "refused")
        self.assertTrue(any(f"handed over to pid {child.pid} and is draining" in m
                            for m in self.messages()))
        # The ready timeout no longer fires.
        self.clock.advance(60)
        self.assertFalse(child.killed)

    def test_ready_without_taking_over_is_a_failure(self):
        self.life.request_upgrade()
        child = self.children[0]
        self.life.child_ready(child)  # READY, but the record still names us
        self.assertTrue(child.killed)
        self.assertEqual(self.life.state, LC.SERVING)
        self.assertIn("did not take over", self.life.last_outcome.error)
        self.assertTrue(self.ports.accepting)

    def test_garbage_on_the_ready_pipe(self):
        self.life.request_upgrade()
        child = self.children[0]
        self.life.child_failed(child, "wrote b'hello' on the ready pipe instead of 'READY <pid>'")
        self.assertTrue(child.killed)
        self.assertEqual(self.life.state, LC.SERVING)
        self.assertEqual(self.lineage.read()["pending"], None)
        # A child the parent gave up on cannot take over afterwards.
        self.assertIn("gave up waiting", self.lineage.take_over(PARENT, child.pid, 2))

    def test_exit_before_ready_changes_nothing_but_the_backoff(self):
        self.life.request_upgrade()
        self.life.child_ended(self.children[0], "exited with status 1")
        self.assertEqual(self.life.state, LC.SERVING)
        outcome = self.life.last_outcome
        self.assertEqual((outcome.result, outcome.child_pid), ("failed", 1000))
        text = "\n".join(self.messages())
        self.assertIn("Upgrade failed: pid 1000 exited with status 1 before it was ready", text)
        self.assertIn("ImportError: no module named x", text)
        self.assertEqual(read_pid(self.pidfile), PARENT)
        self.assertEqual(self.lineage.read()["current"], PARENT)

    def test_exit_after_taking_over_but_before_ready(self):
        """
        The child took over (pidfile names it) and died before its READY
        reached us: we never stopped accepting; the record and the pidfile
        name us again.
        """
        self.life.request_upgrade()
        child = self.children[0]
        self.lineage.take_over(PARENT, child.pid, 2)
        self.assertEqual(read_pid(self.pidfile), child.pid)
        self.life.child_ended(child, "was killed by SIGKILL")
        self.assertEqual(self.life.state, LC.SERVING)
        self.assertEqual(self.lineage.read()["current"], PARENT)
        self.assertEqual(read_pid(self.pidfile), PARENT)
        self.assertIn("it had taken over", self.life.last_outcome.error)

    def test_timeout_kills_child(self):
        self.life.request_upgrade()
        self.clock.advance(29.9)
        self.assertFalse(self.children[0].killed)
        self.clock.advance(0.1)
        self.assertTrue(self.children[0].killed)
        self.assertEqual(self.life.state, LC.SERVING)
        self.assertEqual(self.life.last_outcome.result, "timeout")
        self.assertIn("not ready within 30 s", self.life.last_outcome.error)
        self.assertIsNotNone(self.lineage.take_over(PARENT, 1000, 2))

    def test_timeout_after_the_child_took_over_is_a_handover(self):
        self.life.request_upgrade()
        self.lineage.take_over(PARENT, 1000, 2)
        self.clock.advance(30)  # READY is still on its way
        self.assertFalse(self.children[0].killed)
        self.assertEqual(self.life.last_outcome.result, "ok")
        self.assertIn(self.life.state, (LC.DRAINING, LC.EXITED))

    def test_late_ready_after_timeout_is_ignored(self):
        self.life.request_upgrade()
        self.clock.advance(30)
        self.life.child_ready(self.children[0])
        self.assertEqual(self.life.state, LC.SERVING)

    def test_backoff_doubles_and_schedules_one_attempt(self):
        self.life.request_upgrade()
        self.life.child_ended(self.children[0], "exited with status 1")  # backoff 1 s
        self.assertEqual(self.life.request_upgrade(), "scheduled")
        self.assertEqual(self.life.request_upgrade(), "scheduled")
        self.assertTrue(any("next attempt will run in 1.0 s" in m for m in self.messages()))
        self.assertTrue(any("already scheduled" in m for m in self.messages()))
        self.assertEqual(len(self.children), 1)
        self.clock.advance(1.0)
        self.assertEqual(len(self.children), 2)
        self.life.child_ended(self.children[1], "exited with status 1")  # backoff 2 s
        self.clock.advance(1.5)
        self.assertEqual(self.life.request_upgrade(), "scheduled")
        self.clock.advance(0.5)
        self.assertEqual(len(self.children), 3)

    def test_backoff_is_capped(self):
        for _ in range(6):
            self.clock.advance(100)
            self.life.request_upgrade()
            self.life.child_ended(self.children[-1], "exited with status 1")
        self.assertEqual(self.life.next_attempt_at - self.clock.seconds(), 8.0)

    def test_success_resets_backoff(self):
        self.life.request_upgrade()
        self.life.child_ended(self.children[0], "exited with status 1")
        self.clock.advance(1)
        FakeConnection(self.tracker, busy=True)
        self.upgrade_to_ready_child()
        self.assertEqual(self.life.failures, 0)
        self.assertIsNone(self.life.next_attempt_at)

    def test_spawn_error_is_a_failed_upgrade(self):
        def broken(lifecycle):
            raise OSError("No such file or directory: '/usr/bin/python9'")

        self.life._spawn = broken
        self.life.request_upgrade()
        self.assertEqual(self.life.state, LC.SERVING)
        self.assertIn("could not be spawned", self.life.last_outcome.error)


class TakeBackTests(LifecycleTestCase):
    """
    Which successor exits are deaths (take the listeners back) and which are
    normal ends (issue: two lineages accepting at once).
    """

    def setUp(self):
        LifecycleTestCase.setUp(self)
        self.serve()
        self.busy = FakeConnection(self.tracker, busy=True)  # keeps the drain going
        self.child = self.upgrade_to_ready_child()
        self.assertEqual(self.life.state, LC.DRAINING)

    def test_successor_dying_while_current_is_taken_back(self):
        self.life.child_ended(self.child, "was killed by SIGKILL")
        self.assertEqual(self.life.state, LC.SERVING)
        self.assertTrue(self.ports.accepting)
        self.assertEqual(self.lineage.read()["current"], PARENT)
        self.assertEqual(read_pid(self.pidfile), PARENT)
        self.assertFalse(self.tracker.draining)
        self.assertEqual(self.life.failures, 1)
        self.assertIn("after it took over", self.life.last_outcome.error)
        _, event, payload = self.events[-1]
        self.assertEqual((event, payload["source"]), ("serving", "took-back"))
        # The drain was called off: it never exits by itself.
        self.busy.finish_transaction()
        self.clock.advance(100)
        self.assertEqual(self.exits, [])

    def test_successor_that_handed_over_ended_normally(self):
        # The child upgrades to a grandchild, which takes over from it; the
        # child drains and exits 0.
        self.lineage.expect(self.child.pid, 3000)
        self.assertIsNone(self.lineage.take_over(self.child.pid, 3000, 3))
        self.life.child_ended(self.child, "exited with status 0")
        self.assertEqual(self.life.state, LC.DRAINING)
        self.assertFalse(self.ports.accepting)
        self.assertEqual(read_pid(self.pidfile), 3000)
        self.assertEqual(self.life.failures, 0)
        _, event, payload = self.events[-1]
        self.assertEqual((event, payload["result"]), ("successor-exited", L.HANDED_ON))
        # And the drain goes on to its end.
        self.busy.finish_transaction()
        self.clock.advance(1)
        self.assertEqual(self.exits, [PARENT])

    def test_successor_stopped_by_the_operator_is_not_taken_back(self):
        self.assertTrue(self.lineage.stop(self.child.pid))
        self.life.child_ended(self.child, "exited with status 0")
        self.assertEqual(self.life.state, LC.DRAINING)
        self.assertFalse(self.ports.accepting)
        self.assertEqual(self.events[-1][2]["result"], L.STOPPING)

    def test_no_take_back_once_our_drain_ended(self):
        self.busy.finish_transaction()
        self.clock.advance(1)
        self.assertEqual(self.life.state, LC.EXITED)
        self.life.child_ended(self.child, "was killed by SIGKILL")
        self.assertEqual(self.life.state, LC.EXITED)
        self.assertTrue(self.ports.closed)
        self.assertTrue(any("nothing accepts on the listeners" in m for m in self.messages()))

    def test_no_take_back_during_our_own_shutdown(self):
        self.life.stop()
        self.assertEqual(self.life.state, LC.SHUTTING_DOWN)
        self.life.child_ended(self.child, "was killed by SIGKILL")
        self.assertEqual(self.life.state, LC.SHUTTING_DOWN)
        self.assertFalse(self.ports.accepting)
        self.assertEqual(self.lineage.read()["current"], self.child.pid)

    def test_a_second_upgrade_after_a_take_back(self):
        self.life.child_ended(self.child, "was killed by SIGKILL")
        self.clock.advance(1)  # the backoff of one failure
        second = self.upgrade_to_ready_child()
        self.assertEqual(self.life.state, LC.DRAINING)
        self.assertEqual(read_pid(self.pidfile), second.pid)


class OrphanRaceTests(LifecycleTestCase):
    """
    Generation 1 drains; generation 2 (its successor) upgrades to generation
    3 and dies before 3 is ready. Generation 1 and generation 3 race: the
    lineage record lets exactly one of them serve.
    """

    def setUp(self):
        LifecycleTestCase.setUp(self)
        self.serve()
        FakeConnection(self.tracker, busy=True)
        self.second = self.upgrade_to_ready_child()
        self.lineage.expect(self.second.pid, 3000)  # generation 2 spawned 3000

    def test_older_generation_first(self):
        self.life.child_ended(self.second, "was killed by SIGKILL")
        self.assertEqual(self.life.state, LC.SERVING)
        refusal = self.lineage.take_over(self.second.pid, 3000, 3)
        self.assertIn(f"pid {PARENT} (generation 1) serves now", refusal)
        self.assertEqual(read_pid(self.pidfile), PARENT)

    def test_orphan_first(self):
        self.assertIsNone(self.lineage.take_over(self.second.pid, 3000, 3))
        self.life.child_ended(self.second, "was killed by SIGKILL")
        self.assertEqual(self.life.state, LC.DRAINING)
        self.assertFalse(self.ports.accepting)
        self.assertEqual(read_pid(self.pidfile), 3000)


class StopTests(LifecycleTestCase):
    def setUp(self):
        LifecycleTestCase.setUp(self)
        self.serve()

    def test_stop_while_serving(self):
        conn = FakeConnection(self.tracker, busy=True)
        d = self.life.stop()
        self.assertEqual(self.life.state, LC.SHUTTING_DOWN)
        self.assertTrue(self.ports.closed)
        self.assertTrue(self.lineage.read()["stopping"])
        self.assertEqual(self.events[-1][1:], ("shutting-down", {
            "was_current": True, "pid": PARENT, "generation": 1, "state": LC.SHUTTING_DOWN}))
        self.assertNoResult(d)
        conn.finish_transaction()
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d).at_start, 1)
        self.assertEqual(self.life.state, LC.EXITED)
        self.assertEqual(self.names()[-1], "drained")

    def test_stop_during_upgrade_kills_the_unready_child(self):
        self.life.request_upgrade()
        child = self.children[0]
        d = self.life.stop()
        self.assertTrue(child.killed)
        self.assertEqual(self.life.state, LC.SHUTTING_DOWN)
        self.assertIn("shutting down", self.lineage.take_over(PARENT, child.pid, 2))
        self.life.child_ended(child, "was killed by SIGTERM")
        self.assertEqual(self.life.failures, 0)
        self.assertEqual(self.life.request_upgrade(), "refused")
        self.assertNoResult(d)  # waits for the child to be gone
        child.finished = True
        child.ended.callback("was killed by SIGTERM")
        self.successResultOf(d)

    def test_stop_cancels_a_scheduled_attempt(self):
        self.life.request_upgrade()
        self.life.child_ended(self.children[0], "exited with status 1")
        self.life.request_upgrade()
        self.life.stop()
        self.clock.advance(10)
        self.assertEqual(len(self.children), 1)

    def test_stop_twice_is_refused_with_reason(self):
        FakeConnection(self.tracker, busy=True)
        self.life.stop()
        self.life.stop()
        self.assertTrue(any("stop ignored: already shutting down" in m for m in self.messages()))

    def test_stop_of_a_draining_generation_does_not_stop_the_server(self):
        FakeConnection(self.tracker, busy=True)
        child = self.upgrade_to_ready_child()
        self.life.stop()
        self.assertEqual(self.life.state, LC.SHUTTING_DOWN)
        self.assertFalse(self.lineage.read()["stopping"])
        self.assertEqual(self.lineage.read()["current"], child.pid)
        self.assertEqual(self.events[-1][2]["was_current"], False)


class LineageTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pidfile = os.path.join(self.dir, "p.pid")
        self.lineage = L.Lineage.create(self.pidfile)
        self.addCleanup(self.lineage.close)

    def test_shared_across_processes(self):
        """
        Another process holding the same fd sees and changes the same record.
        """
        self.lineage.begin(1, 1)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 0
            try:
                self.lineage.expect(1, 2)
                code = 0 if self.lineage.take_over(1, 2, 2) is None else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        self.assertEqual(self.lineage.read()["current"], 2)
        self.assertEqual(read_pid(self.pidfile), 2)

    def test_check_refuses_what_is_not_a_record(self):
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.assertRaises(ValueError, L.Lineage.check, r)
        self.assertRaises(ValueError, L.Lineage.check, 999)
        L.Lineage.check(self.lineage.fileno())

    def test_garbage_record_reads_as_empty(self):
        os.pwrite(self.lineage.fileno(), b"{not json", 0)
        self.assertEqual(self.lineage.read()["current"], None)

    def test_pidfile_error_does_not_stop_the_record(self):
        lineage = L.Lineage(self.lineage.fileno(), os.path.join(self.dir, "missing", "p.pid"))
        lineage.begin(1, 1)
        lineage.expect(1, 2)
        self.assertIsNone(lineage.take_over(1, 2, 2))
        self.assertEqual(lineage.read()["current"], 2)
        self.assertIsInstance(lineage.pidfile_error, OSError)

    def test_release_pidfile_only_if_own(self):
        self.lineage.begin(1, 1)
        self.lineage.expect(1, 2)
        self.lineage.take_over(1, 2, 2)
        self.assertFalse(self.lineage.release_pidfile(1))
        self.assertTrue(self.lineage.release_pidfile(2))
        self.assertFalse(os.path.exists(self.pidfile))
