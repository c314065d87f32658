"""
The reload and status commands against a fake server: a pidfile and a status
file the test writes as the generations would, a fake clock, kill and
liveness.
"""

import io
import os
import signal
import sys

from twisted.trial import unittest

from twisted_graceful import cli
from twisted_graceful.pidfile import write_pidfile
from twisted_graceful.statusfile import read_status, update_status_file

OLD, NEW = 1000, 2000


class FakeWorld:
    """
    Time, signals and processes for one reload. C{script} maps a poll number
    to a function run at that poll (what the server does meanwhile).
    """

    def __init__(self, testcase, script=None, alive=(OLD,)):
        self.dir = os.path.abspath(testcase.mktemp())
        os.makedirs(self.dir)
        self.pidfile = os.path.join(self.dir, "twistd.pid")
        self.status = self.pidfile + ".status.json"
        self.now = 100.0
        self.wall = 5000.0
        self.polls = 0
        self.signals = []
        self.alive_pids = set(alive)
        self.script = script or {}
        self.out = io.StringIO()

    def kill(self, pid, sig):
        if pid not in self.alive_pids:
            raise ProcessLookupError()
        self.signals.append((pid, sig))

    def sleep(self, seconds):
        self.now += seconds
        self.wall += seconds
        self.polls += 1
        action = self.script.get(self.polls)
        if action is not None:
            action(self)

    def alive(self, pid):
        return pid in self.alive_pids

    def entry(self, pid, **fields):
        entry = {"pid": pid, "generation": 1, "state": "serving", "updated_at": self.wall}
        entry.update(fields)
        update_status_file(self.status, pid, entry)

    def outcome(self, result, **fields):
        outcome = {"result": result, "child_pid": NEW, "error": None, "duration_seconds": 0.8,
                   "output_tail": [], "finished_at": self.wall}
        outcome.update(fields)
        return outcome

    def reload(self, timeout=10.0):
        command = cli.Reload(self.pidfile, timeout, out=self.out, clock=lambda: self.now,
                             wall=lambda: self.wall, sleep=self.sleep, kill=self.kill,
                             alive=self.alive, poll=0.05)
        return command.run()

    def output(self):
        return self.out.getvalue()


def upgrade_ok(world):
    world.alive_pids.add(NEW)
    world.entry(OLD, state="draining", last_upgrade=world.outcome("ok"))


def new_serving(world):
    world.alive_pids.add(NEW)
    world.entry(NEW, generation=2, parent_pid=OLD)


def pidfile_names_new(world):
    write_pidfile(world.pidfile, NEW)


class ReloadTests(unittest.TestCase):
    def world(self, script=None, alive=(OLD,)):
        world = FakeWorld(self, script, alive)
        write_pidfile(world.pidfile, OLD)
        world.entry(OLD)
        return world

    def test_success_old_writes_first(self):
        world = self.world({3: upgrade_ok, 5: pidfile_names_new, 8: new_serving})
        self.assertEqual(world.reload(), cli.EXIT_OK)
        self.assertEqual(world.signals, [(OLD, signal.SIGHUP)])
        self.assertEqual(world.polls, 8, "waits until the new generation says it serves")
        self.assertIn(f"reloaded: pid {NEW} (generation 2) serves", world.output())
        self.assertEqual(len(world.output().splitlines()), 1)

    def test_success_new_writes_first(self):
        # The new generation says "serving" before the old one records the
        # outcome, and the pidfile changes last.
        world = self.world({2: new_serving, 4: upgrade_ok, 6: pidfile_names_new})
        self.assertEqual(world.reload(), cli.EXIT_OK)
        self.assertEqual(world.polls, 6)

    def test_new_generation_killed_as_the_pidfile_names_it(self):
        # Its entry still says "serving" (a kill -9 leaves no last word): the
        # entry of a pid that is gone is read as gone, not as serving.
        def killed_and_named(world):
            pidfile_names_new(world)
            world.alive_pids.discard(NEW)

        world = self.world({2: new_serving, 3: upgrade_ok, 4: killed_and_named})
        self.assertEqual(world.reload(), cli.EXIT_FAILED)
        self.assertIn(f"pid {NEW} was ready, then exited", world.output())

    def test_outcome_before_the_signal_is_not_ours(self):
        world = self.world({6: upgrade_ok, 7: pidfile_names_new, 8: new_serving})
        world.entry(OLD, last_upgrade=world.outcome(
            "failed", error="old failure", finished_at=world.wall - 30))
        self.assertEqual(world.reload(), cli.EXIT_OK)
        self.assertNotIn("old failure", world.output())

    def test_failed(self):
        def failed(world):
            world.entry(OLD, last_upgrade=world.outcome(
                "failed", error=f"pid {NEW} exited with status 1 before it was ready",
                output_tail=["Traceback (most recent call last):",
                             "RuntimeError: broken deploy: DATABASE_URL is not set",
                             "Failed to load application"]))

        world = self.world({4: failed})
        self.assertEqual(world.reload(), cli.EXIT_FAILED)
        lines = world.output().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn(f"reload failed (failed): pid {NEW} exited with status 1", lines[0])
        self.assertIn(f"pid {OLD} keeps serving", lines[0])
        self.assertIn("RuntimeError: broken deploy: DATABASE_URL is not set", lines[1])

    def test_ready_timeout_is_a_failure(self):
        def timed_out(world):
            world.entry(OLD, last_upgrade=world.outcome(
                "timeout", error=f"pid {NEW} was not ready within 3.0 s; killed it"))

        world = self.world({4: timed_out})
        self.assertEqual(world.reload(), cli.EXIT_FAILED)
        self.assertIn("reload failed (timeout)", world.output())
        self.assertIn("not ready within 3.0 s", world.output())

    def test_timeout_while_upgrading(self):
        def upgrading(world):
            world.entry(OLD, state="upgrading", child={"pid": NEW, "since": world.wall})

        world = self.world({1: upgrading})
        self.assertEqual(world.reload(timeout=2.0), cli.EXIT_TIMEOUT)
        self.assertLessEqual(world.polls, 41)
        self.assertIn("reload timed out after 2 s", world.output())
        self.assertIn(f"still upgrading: the new generation (pid {NEW}) is not ready",
                      world.output())

    def test_timeout_without_status_file(self):
        world = FakeWorld(self)
        write_pidfile(world.pidfile, OLD)
        self.assertEqual(world.reload(timeout=1.0), cli.EXIT_TIMEOUT)
        self.assertIn("no status file", world.output())

    def test_old_exits_without_outcome_new_serves(self):
        def handed_over(world):
            world.alive_pids.discard(OLD)
            world.alive_pids.add(NEW)
            write_pidfile(world.pidfile, NEW)
            world.entry(NEW, generation=2, parent_pid=OLD)

        world = self.world({3: handed_over})
        self.assertEqual(world.reload(), cli.EXIT_OK)
        self.assertIn(f"pid {NEW} (generation 2) serves", world.output())

    def test_old_dies(self):
        world = self.world({3: lambda w: w.alive_pids.discard(OLD)})
        self.assertEqual(world.reload(), cli.EXIT_FAILED)
        self.assertIn(f"pid {OLD} exited and no new generation serves", world.output())

    def test_new_dies_after_ready(self):
        def ok_then_dead(world):
            upgrade_ok(world)
            world.alive_pids.discard(NEW)

        world = self.world({2: ok_then_dead})
        self.assertEqual(world.reload(), cli.EXIT_FAILED)
        self.assertIn(f"pid {NEW} was ready, then exited", world.output())

    def test_missing_pidfile(self):
        world = FakeWorld(self)
        self.assertEqual(world.reload(), cli.EXIT_NOT_RUNNING)
        self.assertIn("no such pidfile", world.output())
        self.assertEqual(world.signals, [])

    def test_dead_pid(self):
        world = FakeWorld(self, alive=())
        write_pidfile(world.pidfile, OLD)
        self.assertEqual(world.reload(), cli.EXIT_NOT_RUNNING)
        self.assertIn(f"names pid {OLD}, which is not running", world.output())
        self.assertEqual(world.signals, [])

    def test_garbage_pidfile(self):
        world = FakeWorld(self)
        with open(world.pidfile, "w") as f:
            f.write("hello\n")
        self.assertEqual(world.reload(), cli.EXIT_NOT_RUNNING)
        self.assertIn("does not contain a process ID", world.output())


class StatusCommandTests(unittest.TestCase):
    def setUp(self):
        self.world = FakeWorld(self)
        write_pidfile(self.world.pidfile, OLD)

    def status(self, **kw):
        out = io.StringIO()
        code = cli.status(self.world.pidfile, out=out, alive=self.world.alive, **kw)
        return code, out.getvalue()

    def test_serving_with_failed_upgrade(self):
        self.world.entry(OLD, serving_since=self.world.wall, listeners={"http": "tcp:1.2.3.4:80"},
                         last_upgrade=self.world.outcome(
                             "failed", error="pid 2000 exited with status 1 before it was ready",
                             output_tail=["RuntimeError: boom"]))
        code, out = self.status()
        self.assertEqual(code, cli.EXIT_OK)
        first, second = out.splitlines()
        self.assertIn(f"pid {OLD} generation 1: serving since", first)
        self.assertIn("http=tcp:1.2.3.4:80", first)
        self.assertIn("last upgrade failed", second)
        self.assertIn("RuntimeError: boom", second)

    def test_took_back_and_older_generations_still_draining(self):
        """
        After a take-back, status says from which pid and why; generations
        still draining are listed as such, dead ones are not.
        """
        self.world.alive_pids.update({OLD, 7000})
        self.world.entry(OLD, generation=2, took_back_from={
            "pid": NEW, "how": "was killed by SIGKILL", "at": self.world.wall},
            last_request={"reason": "SIGHUP", "answer": "scheduled",
                          "why": "backing off after 1 failed upgrade(s)", "at": self.world.wall})
        self.world.entry(7000, generation=1, state="draining")
        self.world.entry(NEW, generation=3, state="serving")  # dead: not listed
        code, out = self.status()
        self.assertIn("took the listeners back at ", out)
        self.assertIn(f"from pid {NEW}, which was killed by SIGKILL", out)
        self.assertIn("last SIGHUP at ", out)
        self.assertIn("scheduled: backing off after 1 failed upgrade(s)", out)
        self.assertIn("also running: pid 7000 generation 1 (draining; it no longer accepts)", out)
        self.assertNotIn(f"pid {NEW} generation 3", out)

    def test_upgrading(self):
        self.world.entry(OLD, state="upgrading", child={"pid": NEW, "since": self.world.wall})
        code, out = self.status()
        self.assertIn(f"upgrading; upgrading to pid {NEW}", out)

    def test_json(self):
        self.world.entry(OLD, state="serving")
        code, out = self.status(as_json=True)
        self.assertIn('"state": "serving"', out)

    def test_not_running(self):
        self.world.alive_pids.clear()
        code, out = self.status()
        self.assertEqual(code, cli.EXIT_NOT_RUNNING)
        self.assertIn("not running", out)

    def test_no_status_file(self):
        code, out = self.status()
        self.assertEqual(code, cli.EXIT_OK)
        self.assertIn(f"pid {OLD} is running (no entry in", out)


class GoneEntriesTests(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()) + ".status.json")

    def test_entry_of_a_pid_that_is_gone_is_marked_when_read(self):
        update_status_file(self.path, OLD, {"pid": OLD, "state": "serving"})
        update_status_file(self.path, NEW, {"pid": NEW, "state": "serving"})
        doc = read_status(self.path, alive=lambda pid: pid == NEW)
        self.assertEqual(doc["processes"][str(OLD)]["state"], "gone")
        self.assertEqual(doc["processes"][str(OLD)]["recorded_state"], "serving")
        self.assertEqual(doc["processes"][str(NEW)]["state"], "serving")

    def test_exited_entries_stay_exited(self):
        update_status_file(self.path, OLD, {"pid": OLD, "state": "exited"})
        doc = read_status(self.path, alive=lambda pid: False)
        self.assertEqual(doc["processes"][str(OLD)]["state"], "exited")

    def test_without_a_liveness_check_the_file_is_read_as_written(self):
        update_status_file(self.path, OLD, {"pid": OLD, "state": "serving"})
        self.assertEqual(read_status(self.path)["processes"][str(OLD)]["state"], "serving")


class MainTests(unittest.TestCase):
    def setUp(self):
        self.patch(sys, "stdout", io.StringIO())
        self.patch(sys, "stderr", io.StringIO())

    def test_usage(self):
        self.assertRaises(SystemExit, cli.main, ["reload", "--timeout", "-1"])
        self.assertRaises(SystemExit, cli.main, [])

    def test_missing_pidfile_exit_status(self):
        path = os.path.abspath(self.mktemp())
        self.assertEqual(cli.main(["status", "--pidfile", path]), cli.EXIT_NOT_RUNNING)
        self.assertEqual(cli.main(["reload", "--pidfile", path]), cli.EXIT_NOT_RUNNING)


class MasterStatusTests(unittest.TestCase):
    def test_since_is_when_the_current_workers_took_over(self):
        entry = {"role": "master", "state": "serving", "generation": 3,
                 "serving_since": 1000.0,
                 "last_upgrade": {"result": "ok", "finished_at": 2000.0,
                                  "duration_seconds": 0.2},
                 "workers": [{"pid": 11, "generation": 3, "state": "serving"},
                             {"pid": 12, "generation": 2, "state": "draining"}]}
        lines = cli.master_status(10, entry, alive=lambda pid: pid == 11)
        self.assertEqual(lines[0], f"master pid 10: serving, workers generation 3 since "
                                   f"{cli._when(2000.0)}")
        self.assertEqual(lines[1], "  worker pid 11 generation 3: serving")
        self.assertNotIn("worker pid 12", "\n".join(lines))
        self.assertNotIn("zygote", "\n".join(lines))

    def test_the_zygote(self):
        entry = {"role": "master", "state": "serving", "generation": 1,
                 "workers": [{"pid": 11, "generation": 1, "state": "serving"}],
                 "zygote": 13, "zygote_ready": False}
        lines = cli.master_status(10, entry, alive=lambda pid: True)
        self.assertEqual(lines[2], "  zygote pid 13: importing")
        entry["zygote_ready"] = True
        lines = cli.master_status(10, entry, alive=lambda pid: True)
        self.assertEqual(lines[2], "  zygote pid 13: forks the new workers")
        self.assertNotIn("zygote", "\n".join(cli.master_status(10, entry, alive=lambda p: p != 13)))
