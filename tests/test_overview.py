"""
The operator's view without processes: the timeline of upgrades told its
events by hand, the live counts in the status file on a L{Clock}, the
overview of a status file's content, C{top}'s text, and the status page's
resources rendered with L{DummyRequest}.
"""

import io
import json
import os
import re

from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from twisted_graceful.drain import DrainReport
from twisted_graceful.lifecycle import UpgradeOutcome
from twisted_graceful.metrics import GracefulMetrics
from twisted_graceful.overview import render_text, server_overview, stage_list
from twisted_graceful.statusfile import ProcessStatus, StatusFile, read_status
from twisted_graceful.statuspage import OverviewResource, StatusPage
from twisted_graceful.timeline import UpgradeTimeline
from twisted_graceful.top import CLEAR, frame, top

from tests.test_drain import FakeConnection
from tests.test_metrics import emit, make_service


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def outcome(result="ok", child_pid=None, error=None, duration=0.5, output=()):
    return UpgradeOutcome(result, child_pid, error, duration, output)


class TimelineTests(unittest.TestCase):
    def setUp(self):
        self.clock = FakeClock()
        self.timeline = UpgradeTimeline(self.clock)

    def tell(self, event, at, **details):
        self.clock.now = at
        self.timeline(event, **details)

    def test_a_generation_records_every_stage(self):
        self.tell("upgrade-started", 1000.0, child_pid=51, reason="SIGHUP", generation=1)
        self.tell("upgrade-requested", 1000.0, answer="started", reason="SIGHUP")
        self.tell("upgrade-ok", 1000.8, outcome=outcome(child_pid=51, duration=0.8))
        self.tell("handed-over", 1000.9, child_pid=51)
        self.tell("drained", 1004.0, report=None)
        [record] = self.timeline.as_list()
        self.assertEqual(
            {key: record[key] for key in ("signal_at", "spawned_at", "ready_at",
                                          "handed_over_at", "drained_at", "exited_at")},
            {"signal_at": 1000.0, "spawned_at": 1000.0, "ready_at": 1000.8,
             "handed_over_at": 1000.9, "drained_at": 1004.0, "exited_at": 1004.0})
        self.assertEqual((record["result"], record["child_pids"], record["from_generation"]),
                         ("ok", [51], 1))
        self.assertEqual([name for name, _ in stage_list(record)],
                         ["signal", "spawned", "ready", "handed over", "drained", "exited"])

    def test_a_failed_upgrade_keeps_the_reason_and_the_last_lines(self):
        self.tell("upgrade-started", 1000.0, child_pid=51, reason="SIGHUP", generation=1)
        self.tell("upgrade-failed", 1001.5, outcome=outcome(
            "failed", 51, "pid 51 exited with status 1 before it was ready", 1.5,
            ["", "Traceback (most recent call last):", "ImportError: no module named app"]))
        [record] = self.timeline.as_list()
        self.assertEqual(record["result"], "failed")
        self.assertEqual(record["error"], "pid 51 exited with status 1 before it was ready")
        self.assertEqual(record["output_tail"],
                         ["Traceback (most recent call last):", "ImportError: no module named app"])
        self.assertEqual(stage_list(record),
                         [("signal", 1000.0), ("spawned", 1000.0), ("failed", 1001.5),
                          ("exited", 1001.5)])
        # Nothing that happens later changes a finished record.
        self.tell("drained", 1009.0, report=None)
        self.assertIsNone(self.timeline.as_list()[0]["drained_at"])

    def test_a_signal_during_the_backoff_is_the_start_of_its_attempt(self):
        self.tell("upgrade-requested", 1000.0, answer="scheduled", reason="SIGHUP")
        self.tell("upgrade-started", 1002.0, child_pid=52, reason="SIGHUP (after backoff)",
                  generation=1)
        [record] = self.timeline.as_list()
        self.assertEqual((record["signal_at"], record["spawned_at"]), (1000.0, 1002.0))

    def test_a_master_is_done_when_its_last_old_worker_exits(self):
        old = [{"pid": 11, "generation": 1, "state": "serving"},
               {"pid": 12, "generation": 1, "state": "serving"}]
        new = [{"pid": 21, "generation": 2, "state": "starting"},
               {"pid": 22, "generation": 2, "state": "starting"}]
        self.tell("upgrade-started", 1000.0, child_pid=None, reason="SIGHUP", generation=1,
                  workers=old + new)
        retiring = [dict(w, state="draining") for w in old]
        self.tell("upgrade-ok", 1001.0, outcome=outcome(), generation=2,
                  workers=[dict(w, state="serving") for w in new] + retiring)
        record = self.timeline.as_list()[0]
        self.assertEqual((record["child_pids"], record["retired_pids"]), ([21, 22], [11, 12]))
        self.assertEqual((record["handed_over_at"], record["drained_at"]), (1001.0, None))
        self.tell("worker-exited", 1002.0, worker_pid=11, expected=True, generation=2,
                  workers=new)
        self.assertIsNone(self.timeline.as_list()[0]["drained_at"])
        self.tell("worker-exited", 1003.0, worker_pid=12, expected=True, generation=2,
                  workers=new)
        record = self.timeline.as_list()[0]
        self.assertEqual((record["drained_at"], record["exited_at"]), (1003.0, 1003.0))

    def test_a_successor_that_died_is_taken_back(self):
        self.tell("upgrade-started", 1000.0, child_pid=51, reason="SIGHUP", generation=1)
        self.tell("upgrade-ok", 1000.8, outcome=outcome(child_pid=51))
        self.tell("handed-over", 1000.8, child_pid=51)
        self.tell("serving", 1002.0, source="took-back")
        [record] = self.timeline.as_list()
        self.assertEqual((record["result"], record["exited_at"]), ("taken back", 1002.0))
        self.assertEqual(record["error"], "the new generation died; this one serves again")
        self.assertEqual(stage_list(record),
                         [("signal", 1000.0), ("spawned", 1000.0), ("ready", 1000.8),
                          ("handed over", 1000.8), ("taken back", 1002.0)])

    def test_only_the_last_upgrades_are_kept(self):
        for n in range(8):
            self.tell("upgrade-started", 1000.0 + n, child_pid=100 + n, reason="SIGHUP",
                      generation=1)
            self.tell("upgrade-failed", 1000.5 + n, outcome=outcome("timeout", 100 + n, "late"))
        self.assertEqual([r["child_pids"] for r in self.timeline.as_list()],
                         [[103], [104], [105], [106], [107]])


class LiveCountsTests(unittest.TestCase):
    """
    Each serving process rewrites its entry once a second when its
    connections, transactions or requests changed, and only then.
    """

    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.pidfile = os.path.join(directory, "twistd.pid")
        self.path = self.pidfile + ".status.json"
        self.graceful = make_service(pidfile=self.pidfile)
        self.clock = self.graceful.reactor
        self.status = ProcessStatus(self.graceful)
        self.metrics = GracefulMetrics(self.graceful, status=self.status)
        StatusFile(self.graceful, self.status)

    def live(self):
        return read_status(self.path)["processes"][str(os.getpid())]["live"]

    def test_connections_transactions_and_requests(self):
        emit(self.graceful, "serving", source="bound")
        self.assertEqual(self.live(), {"connections": 0, "transactions": 0, "requests": 0})
        idle = FakeConnection(self.graceful.tracker)
        FakeConnection(self.graceful.tracker, busy=True)
        self.clock.advance(1.0)
        self.assertEqual(self.live(), {"connections": 2, "transactions": 1, "requests": 0})
        factory = type("Factory", (), {})()
        self.metrics.observe_txn_factory(factory)
        factory.transaction_observer("committed")
        factory.transaction_observer("aborted")
        idle.untrack()
        self.clock.advance(1.0)
        self.assertEqual(self.live(), {"connections": 1, "transactions": 1, "requests": 2})

    def test_nothing_written_when_nothing_changed(self):
        emit(self.graceful, "serving", source="bound")
        os.unlink(self.path)
        self.clock.advance(5.0)
        self.assertFalse(os.path.exists(self.path))
        FakeConnection(self.graceful.tracker)
        self.clock.advance(1.0)
        self.assertEqual(self.live()["connections"], 1)

    def test_the_metrics_listeners_own_connections_are_not_counted(self):
        emit(self.graceful, "serving", source="bound")
        scrape = FakeConnection(self.graceful.tracker)
        scrape.protocol_name = "metrics"
        self.graceful.tracker._changed()
        self.clock.advance(1.0)
        self.assertEqual(self.live()["connections"], 0)

    def test_refreshing_stops_once_drained(self):
        emit(self.graceful, "serving", source="bound")
        emit(self.graceful, "drained", "exited", report=DrainReport())
        self.assertEqual(self.clock.getDelayedCalls(), [])


def entry(pid, role, generation, state, started_at=900.0, **more):
    return dict({"pid": pid, "role": role, "generation": generation, "state": state,
                 "started_at": started_at, "updated_at": 999.0}, **more)


class ServerOverviewTests(unittest.TestCase):
    def setUp(self):
        self.alive = {10, 11, 21}.__contains__
        self.doc = {"processes": {
            "10": entry(10, "master", 2, "serving", 100.0, workers=[
                {"pid": 11, "generation": 1, "state": "draining"},
                {"pid": 21, "generation": 2, "state": "serving"}],
                upgrades=[{"reason": "SIGHUP", "from_generation": 1, "signal_at": 990.0,
                           "spawned_at": 990.0, "ready_at": 991.0, "handed_over_at": 991.0,
                           "drained_at": None, "exited_at": None, "result": "ok",
                           "error": None, "output_tail": [], "duration_seconds": 1.0,
                           "child_pids": [21], "retired_pids": [11]}]),
            # Its own entry still says serving: the master retired it.
            "11": entry(11, "worker", 1, "serving", 500.0,
                        live={"connections": 3, "transactions": 1, "requests": 40}),
            "21": entry(21, "worker", 2, "serving", 990.5,
                        live={"connections": 5, "transactions": 0, "requests": 2}),
            "12": entry(12, "worker", 1, "exited"),  # gone
        }}

    def test_rows(self):
        view = server_overview(self.doc, now=1000.0, alive=self.alive)
        self.assertEqual(
            [(r["pid"], r["role"], r["generation"], r["state"], r["connections"],
              r["transactions"], r["requests"], r["uptime_seconds"]) for r in view["processes"]],
            [(10, "master", 2, "serving", None, None, None, 900.0),
             (21, "worker", 2, "serving", 5, 0, 2, 9.5),
             (11, "worker", 1, "draining", 3, 1, 40, 500.0)])

    def test_upgrades_newest_first_and_unfinished_ones_of_dead_processes(self):
        self.doc["processes"]["12"]["upgrades"] = [
            {"reason": "SIGHUP", "spawned_at": 995.0, "signal_at": 995.0, "result": None,
             "child_pids": [30]}]
        view = server_overview(self.doc, now=1000.0, alive=self.alive)
        self.assertEqual([(u["pid"], u["result"]) for u in view["upgrades"]],
                         [(12, "unknown"), (10, "ok")])
        self.assertEqual(view["upgrades"][0]["error"],
                         "pid 12 is gone without saying how the upgrade ended")

    def test_a_generation_without_a_master(self):
        doc = {"processes": {"5": entry(5, None, 3, "shutting-down"),
                             "6": entry(6, None, 4, "upgrading")}}
        view = server_overview(doc, now=1000.0, alive=lambda pid: True)
        self.assertEqual([(r["pid"], r["role"], r["state"]) for r in view["processes"]],
                         [(6, "generation", "upgrading"), (5, "generation", "draining")])

    def test_nothing_to_show(self):
        self.assertEqual(server_overview(None, now=5.0),
                         {"at": 5.0, "processes": [], "upgrades": []})

    def test_text(self):
        view = server_overview(self.doc, now=1000.0, alive=self.alive)
        lines = render_text(view, width=100, pidfile="/srv/twistd.pid")
        self.assertRegex(lines[0], r"^twisted-graceful /srv/twistd.pid \d\d:\d\d:\d\d 3 process")
        self.assertEqual([re.split(r"\s+", line.strip()) for line in lines[2:6]], [
            ["PID", "ROLE", "GEN", "STATE", "CONNS", "IN", "TXN", "REQUESTS", "UPTIME"],
            ["10", "master", "2", "serving", "-", "-", "-", "15m00s"],
            ["21", "worker", "2", "serving", "5", "0", "2", "9s"],
            ["11", "worker", "1", "draining", "3", "1", "40", "8m20s"],
        ])
        text = "\n".join(lines)
        self.assertIn("SIGHUP: generation 1 (pid 10) -> pid 21: ok in 1.00 s", text)
        self.assertRegex(text, r"signal \S+ > spawned \S+ \+0.0s > ready \S+ \+1.0s > "
                               r"handed over \S+ \+1.0s")
        self.assertTrue(all(len(line) <= 100 for line in lines))

    def test_text_of_a_failed_upgrade(self):
        self.doc["processes"]["10"]["upgrades"][0].update(
            result="failed", error="worker pid 21 exited with status 1 before the set was ready",
            output_tail=["a", "b", "ImportError: app"], ready_at=None, handed_over_at=None,
            exited_at=991.0)
        text = "\n".join(render_text(server_overview(self.doc, now=1000.0, alive=self.alive)))
        self.assertIn("why: worker pid 21 exited with status 1 before the set was ready", text)
        self.assertIn("| ImportError: app", text)
        self.assertRegex(text, r"> failed \S+ \+1.0s > exited")


class StatusPageTests(unittest.TestCase):
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.pidfile = os.path.join(directory, "twistd.pid")

    def test_overview_json_reads_the_status_file(self):
        graceful = make_service(pidfile=self.pidfile)
        status = ProcessStatus(graceful)
        StatusFile(graceful, status)
        emit(graceful, "serving", source="bound")
        view = json.loads(OverviewResource(status).render(DummyRequest([b""])))
        self.assertEqual([(r["pid"], r["state"]) for r in view["processes"]],
                         [(os.getpid(), "serving")])
        self.assertEqual((view["answered_by"], view["pidfile"]), (os.getpid(), self.pidfile))

    def test_overview_without_a_pidfile_is_this_process(self):
        graceful = make_service()
        status = ProcessStatus(graceful)
        emit(graceful, "serving", source="bound")
        view = json.loads(OverviewResource(status).render(DummyRequest([b""])))
        self.assertEqual([r["pid"] for r in view["processes"]], [os.getpid()])

    def test_page_is_self_contained_and_has_real_table_headers(self):
        request = DummyRequest([b""])
        html = StatusPage().render(request).decode()
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"),
                         [b"text/html; charset=utf-8"])
        self.assertIn(b"default-src 'none'",
                      request.responseHeaders.getRawHeaders(b"content-security-policy")[0])
        self.assertNotRegex(html, r"(src|href)=\"(https?:)?//")
        self.assertEqual(len(re.findall(r'<th scope="col">', html)), 8)
        self.assertIn("<caption>", html)
        self.assertIn('fetch("overview"', html)


class TopTests(unittest.TestCase):
    def test_no_status_file(self):
        pidfile = os.path.abspath(self.mktemp())
        out = io.StringIO()
        self.assertEqual(top(pidfile, once=True, out=out), 3)
        said = (f"twisted-graceful {pidfile}: no status file {pidfile}.status.json (is the "
                f"server running, with this --pidfile?); retrying every second")
        self.assertEqual(out.getvalue(), said + "\n")

    def test_redraws_until_told(self):
        pidfile = os.path.abspath(self.mktemp())
        graceful = make_service(pidfile=pidfile)
        StatusFile(graceful)
        emit(graceful, "serving", source="bound")
        out, sleeps = io.StringIO(), []
        self.assertEqual(top(pidfile, interval=0.5, out=out, sleep=sleeps.append,
                             iterations=3), 0)
        self.assertEqual(sleeps, [0.5, 0.5])
        self.assertEqual(out.getvalue().count(CLEAR), 3)
        self.assertIn(f"{os.getpid():>7}  generation", out.getvalue())
        self.assertEqual(frame(pidfile)[2].split()[:2], ["PID", "ROLE"])
