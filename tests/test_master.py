"""
The master's state machine, driven by a L{Clock} and fake workers: worker
sets started whole or not at all, blue-green upgrades, supervision with a
backoff for workers that keep dying, and the shutdown.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from twisted_graceful import master as M
from twisted_graceful.lifecycle import EXITED, SERVING, SHUTTING_DOWN, STARTING, UPGRADING


class FakeWorker:
    def __init__(self, pid):
        self.pid = pid
        self.ready = False
        self.finished = False
        self.signals = []  # ("kill",) or ("terminate", kill_after)
        self.ended = defer.Deferred()

    def kill(self):
        self.signals.append(("kill",))

    def terminate(self, kill_after):
        self.signals.append(("terminate", kill_after))

    def output_tail(self):
        return [f"worker {self.pid} says hello"]


class MasterTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.spawned = []
        self.events = []
        self.exits = []
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.master = M.Master(self.clock, workers=2, spawn=self.spawn, pid=1,
                               ready_timeout=10, drain_timeout=30, abort_grace=2,
                               backoff_base=1.0, backoff_max=8.0,
                               exit=lambda: self.exits.append(self.master.exit_status))
        self.master.observers.append(lambda event, **kw: self.events.append((event, kw)))

    def spawn(self, master, generation):
        worker = FakeWorker(100 + len(self.spawned))
        self.spawned.append(worker)
        return worker

    def messages(self):
        return "\n".join(formatEvent(e) for e in self.logged)

    def ready(self, *workers):
        for worker in workers:
            worker.ready = True
            self.master.child_ready(worker)

    def end(self, worker, how="exited with status 0"):
        worker.finished = True
        self.master.child_ended(worker, how)

    def serve(self):
        self.master.start()
        first = list(self.spawned)
        self.ready(*first)
        return first

    def upgrade(self):
        self.assertEqual(self.master.request_upgrade("SIGHUP"), "started")
        return self.spawned[-2:]

    def test_first_set_serves_once_every_worker_is_ready(self):
        self.master.start()
        self.assertEqual(len(self.spawned), 2)
        self.assertEqual(self.master.request_upgrade("SIGHUP"), "refused")
        self.ready(self.spawned[0])
        self.assertEqual(self.master.state, STARTING)
        self.ready(self.spawned[1])
        self.assertEqual(self.master.state, SERVING)
        event, payload = [e for e in self.events if e[0] == "serving"][0]
        self.assertEqual((payload["role"], payload["generation"]), ("master", 1))
        self.assertEqual([w["state"] for w in payload["workers"]], ["serving", "serving"])

    def test_a_reexecuted_master_is_upgrading_when_it_says_serving(self):
        # What observers (the status file) see at "serving" must not look
        # settled: the re-exec's upgrade has started by then.
        adopted = [FakeWorker(7), FakeWorker(8)]
        for worker in adopted:
            worker.ready = True
        states = []
        self.master.observers.append(
            lambda event, **kw: states.append(self.master.state) if event == "serving" else None)
        self.master.adopt(adopted, [], generation=4)
        self.assertEqual(states, [UPGRADING])
        self.assertEqual(len(self.spawned), 2)  # the new set, with the code on disk
        self.ready(*self.spawned)
        self.assertEqual(self.master.generation, 5)

    def test_blue_green_upgrade(self):
        old = self.serve()
        new = self.upgrade()
        self.assertEqual(self.master.state, UPGRADING)
        self.ready(new[0])
        self.assertEqual(old[0].signals, [])  # the old set serves until every new one is ready
        self.assertIn("already in progress", self.master.refusal("upgrade"))
        self.clock.advance(0.5)
        self.ready(new[1])
        self.assertEqual(self.master.generation, 2)
        for worker in old:
            self.assertEqual(worker.signals, [("terminate", 30 + 2 + 5.0)])
        # Done only once every old worker says it stopped accepting.
        self.assertEqual(self.master.state, UPGRADING)
        self.assertIsNone(self.master.last_outcome)
        self.master.child_stopped(old[0])
        self.assertEqual(self.master.state, UPGRADING)
        self.master.child_stopped(old[1])
        self.assertEqual(self.master.state, SERVING)
        self.assertEqual(self.master.last_outcome.result, "ok")
        self.assertEqual(self.master.last_outcome.duration, 0.5)
        states = {w["pid"]: w["state"] for w in self.master.describe_workers()}
        self.assertEqual(states, {old[0].pid: "draining", old[1].pid: "draining",
                                  new[0].pid: "serving", new[1].pid: "serving"})
        self.end(old[0])
        self.end(old[1])
        self.assertEqual(len(self.master.describe_workers()), 2)
        self.assertEqual(len(self.spawned), 4)  # retired workers are not replaced

    def test_an_old_worker_that_never_says_stopped_delays_the_upgrade_at_most_5_s(self):
        old = self.serve()
        new = self.upgrade()
        self.ready(*new)
        self.master.child_stopped(old[0])
        self.clock.advance(4.9)
        self.assertEqual(self.master.state, UPGRADING)
        self.clock.advance(0.1)
        self.assertEqual(self.master.state, SERVING)
        self.assertIn(f"worker(s) pid {old[1].pid} did not confirm", self.messages())
        # An old worker that exits has stopped accepting too.
        newer = self.upgrade()
        self.ready(*newer)
        for worker in new:
            self.end(worker)
        self.assertEqual(self.master.state, SERVING)

    def test_one_failing_worker_stops_the_whole_new_set(self):
        old = self.serve()
        new = self.upgrade()
        self.ready(new[0])
        self.end(new[1], "exited with status 1")
        self.assertEqual(self.master.state, SERVING)
        self.assertEqual(self.master.generation, 1)
        self.assertEqual(new[0].signals, [("kill",)])
        self.assertEqual(old[0].signals, [])
        outcome = self.master.last_outcome
        self.assertEqual(outcome.result, "failed")
        self.assertIn(f"worker pid {new[1].pid} exited with status 1", outcome.error)
        self.assertIn("Workers generation 1 (pids 100, 101) keep serving", self.messages())
        # Backoff: the next HUP waits.
        self.assertEqual(self.master.request_upgrade("SIGHUP"), "scheduled")

    def test_new_set_not_ready_in_time(self):
        self.serve()
        new = self.upgrade()
        self.ready(new[0])
        self.clock.advance(10)
        self.assertEqual(self.master.last_outcome.result, "timeout")
        self.assertIn(f"pid {new[1].pid} not ready within 10 s", self.master.last_outcome.error)
        self.assertEqual(new[1].signals, [("kill",)])
        self.assertEqual(self.master.state, SERVING)

    def test_dead_worker_is_replaced_at_once(self):
        old = self.serve()
        self.clock.advance(60)  # it served a while: not a crash loop
        self.end(old[0], "was killed by SIGKILL")
        self.assertEqual(len(self.spawned), 3)
        replacement = self.spawned[2]
        self.assertIn("worker pid 100 (generation 1) was killed by SIGKILL; replacing it",
                      self.messages())
        self.ready(replacement)
        self.assertEqual(sorted(w.pid for w in self.master.current.workers),
                         [old[1].pid, replacement.pid])

    def test_crash_loop_backs_off(self):
        self.serve()
        delays = []
        for _ in range(5):
            victim = self.master.current.workers[0] if self.master.current.workers else None
            if victim is None:
                break
            before = len(self.spawned)
            self.end(victim, "exited with status 1")
            waited = 0.0
            while len(self.spawned) == before:
                self.clock.advance(0.5)
                waited += 0.5
                self.assertLess(waited, 60)
            delays.append(waited)
            self.ready(self.spawned[-1])
        # At once, then after 1, 2, 4, 8 s (capped) while it keeps dying.
        self.assertEqual(delays, [0.0, 1.0, 2.0, 4.0, 8.0])
        self.assertEqual(self.master.restarts, 5)

    def test_stop_drains_every_worker_then_exits(self):
        """
        (With a new set still starting: it is killed, not drained.)
        """
        old = self.serve()
        new = self.upgrade()
        d = self.master.stop()
        self.assertEqual(self.master.state, SHUTTING_DOWN)
        for worker in old:
            self.assertEqual(worker.signals, [("terminate", 37.0)])
        for worker in new:
            self.assertEqual(worker.signals, [("kill",)])
        for worker in old + new[:1]:
            self.end(worker, "exited with status 0")
        self.assertNoResult(d)
        self.end(new[1], "was killed by SIGTERM")
        self.successResultOf(d)
        self.assertEqual(self.master.state, EXITED)
        self.assertEqual(len(self.spawned), 4)  # nothing replaced during a shutdown

    def test_first_set_failing_ends_the_master(self):
        self.master.start()
        first = list(self.spawned)
        self.end(first[0], "exited with status 1")
        self.assertEqual(self.master.state, SHUTTING_DOWN)
        self.assertEqual(first[1].signals, [("kill",)])
        self.assertEqual(self.exits, [])
        self.end(first[1], "was killed by SIGTERM")
        self.assertEqual(self.exits, [M.EXIT_WORKERS_FAILED])
        self.assertIn("the first workers could not start", self.messages())


class MasterServiceTests(unittest.TestCase):
    """
    What a worker is handed (a recorded spawnProcess, no real process).
    """

    def test_workers_get_the_sockets_and_a_ready_pipe_but_no_lineage(self):
        import os
        import socket

        from tests.test_service import SpawningReactor

        reactor = SpawningReactor()
        sockets = {}
        for name in ("http", "txn"):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            self.addCleanup(sock.close)
            sockets[name] = sock
        service = M.MasterService(
            reactor, sockets, workers=2, pidfile=os.path.abspath(self.mktemp()),
            environ={"PATH": "/bin"}, install_signal_handlers=False, relay_output=False,
            command=("/usr/bin/python3", ["python3", "twistd", "graceful"]))
        service.startService()
        self.assertEqual(len(reactor.spawned), 2)
        spawned = reactor.spawned[0]
        self.assertEqual(spawned["childFDs"], {
            0: 0, 1: "r", 2: "r", 3: sockets["http"].fileno(), 4: "r",
            5: sockets["txn"].fileno(), 6: 1, 7: 2})
        env = spawned["env"]
        self.assertEqual(env["GRACEFUL_ROLE"], "worker")
        self.assertEqual(env["GRACEFUL_GENERATION"], "1")
        self.assertEqual(env["GRACEFUL_LISTENERS"], "http=3,txn=5")
        self.assertNotIn("GRACEFUL_LINEAGE_FD", env)
        self.assertEqual(env["GRACEFUL_PARENT_PID"], str(os.getpid()))
        # Ready, then a HUP: a new set of two.
        for spawned in reactor.spawned:
            spawned["proto"].childDataReceived(4, b"READY %d\n" % (spawned["transport"].pid,))
        self.assertEqual(service.state, "serving")
        self.assertEqual(service.upgrade("SIGHUP"), "started")
        self.assertEqual([s["env"]["GRACEFUL_GENERATION"] for s in reactor.spawned[2:]],
                         ["2", "2"])
