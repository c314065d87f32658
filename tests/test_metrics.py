"""
Metrics, C{/status} and the status file, without processes: a real
L{GracefulService} (never started) and L{DrainTracker}, fake or
L{StringTransport} connections, events told by hand.
"""

import json
import os

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web import resource
from twisted.web.test.requesthelper import DummyRequest

from twisted_graceful.drain import DrainReport
from twisted_graceful.http import GracefulSite
from twisted_graceful.inherit import Inheritance
from twisted_graceful.lifecycle import UpgradeOutcome
from twisted_graceful.metrics import RELOADS_ENV, GracefulMetrics
from twisted_graceful.service import GracefulService
from twisted_graceful.statusfile import (
    ProcessStatus,
    StatusFile,
    StatusResource,
    read_status,
    update_status_file,
)
from twisted_graceful.txn import TxnFactory

from tests.test_drain import FakeConnection
from tests.test_txn_protocol import FakeIdentity, FakeStore


class Page(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        if request.path == b"/missing":
            request.setResponseCode(404)
        return b"ok"


def emit(graceful, event, state="serving", **details):
    """
    What the lifecycle tells its observers: the event with the state it led to.
    """
    graceful.lifecycle.state = state
    graceful.lifecycle._tell(event, **details)


def make_service(environ=None, inheritance=None, pidfile=None):
    return GracefulService(Clock(), environ={} if environ is None else environ,
                           inheritance=inheritance, install_signal_handlers=False,
                           pidfile=pidfile)


class MetricsTestCase(unittest.TestCase):
    def setUp(self):
        self.environ = {}
        self.graceful = make_service(self.environ)
        self.metrics = GracefulMetrics(self.graceful)

    def value(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels)


class ConnectionGaugeTests(MetricsTestCase):
    def test_fake_connections_open_and_close(self):
        tracker = self.graceful.tracker
        self.assertIsNone(self.value("graceful_open_connections", protocol="fake"))
        a = FakeConnection(tracker)
        b = FakeConnection(tracker, busy=True)
        self.assertEqual(self.value("graceful_open_connections", protocol="fake"), 2)
        self.assertEqual(self.value("graceful_inflight_transactions", protocol="fake"), 1)
        b.finish_transaction()
        self.assertEqual(self.value("graceful_inflight_transactions", protocol="fake"), 0)
        a.untrack()
        b.untrack()
        # A protocol seen once stays, at zero.
        self.assertEqual(self.value("graceful_open_connections", protocol="fake"), 0)

    def test_http_channel_requests_by_status_class(self):
        site = GracefulSite(Page(), drain_tracker=self.graceful.tracker, reactor=Clock())
        self.metrics.observe_http_site(site)
        emit(self.graceful, "serving", source="bound")
        self.assertEqual(self.value("graceful_open_connections", protocol="http"), 0)
        self.assertEqual(self.value("graceful_requests_total", protocol="http", result="2xx"), 0)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport()
        channel.makeConnection(transport)
        self.assertEqual(self.value("graceful_open_connections", protocol="http"), 1)
        self.assertEqual(self.value("graceful_inflight_transactions", protocol="http"), 0)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"GET /missing HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"404", transport.value())
        self.assertEqual(self.value("graceful_requests_total", protocol="http", result="2xx"), 1)
        self.assertEqual(self.value("graceful_requests_total", protocol="http", result="4xx"), 1)
        channel.connectionLost(None)
        self.assertEqual(self.value("graceful_open_connections", protocol="http"), 0)

    def test_self_test_before_serving_not_counted(self):
        # Nothing is accepted before the process is ready: a request its site
        # answers meanwhile is the readiness self-test, not a client's.
        site = GracefulSite(Page(), drain_tracker=self.graceful.tracker, reactor=Clock())
        self.metrics.observe_http_site(site)

        def get():
            channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
            channel.makeConnection(StringTransport())
            channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: self-test\r\n\r\n")
            channel.connectionLost(None)

        get()
        self.assertEqual(self.value("graceful_requests_total", protocol="http", result="2xx"), 0)
        emit(self.graceful, "serving", source="bound")
        get()
        self.assertEqual(self.value("graceful_requests_total", protocol="http", result="2xx"), 1)

    def test_transactions_by_result(self):
        store = FakeStore()
        factory = TxnFactory(store, FakeIdentity(), Clock(), drain_tracker=self.graceful.tracker,
                             emit=lambda line: None)
        self.metrics.observe_txn_factory(factory)
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertEqual(self.value("graceful_open_connections", protocol="txn"), 1)
        proto.dataReceived(b"BEGIN\r\nSET a 1\r\n")
        self.assertEqual(self.value("graceful_inflight_transactions", protocol="txn"), 1)
        proto.dataReceived(b"COMMIT\r\nBEGIN\r\nSET b 2\r\nABORT\r\nBEGIN\r\n")
        self.assertEqual(self.value("graceful_requests_total", protocol="txn", result="committed"),
                         1)
        self.assertEqual(self.value("graceful_requests_total", protocol="txn", result="aborted"), 1)
        proto.connectionLost(None)  # the open transaction is aborted
        self.assertEqual(self.value("graceful_requests_total", protocol="txn", result="aborted"), 2)
        self.assertEqual(self.value("graceful_requests_total", protocol="txn", result="error"), 0)
        self.assertEqual(self.value("graceful_open_connections", protocol="txn"), 0)


class UpgradeMetricsTests(MetricsTestCase):
    def test_outcomes_counted(self):
        for result in ("ok", "failed", "timeout"):
            self.assertEqual(self.value("graceful_reloads_total", result=result), 0)
        emit(self.graceful, "upgrade-failed", outcome=UpgradeOutcome("failed", 10, "exited", 0.5))
        emit(self.graceful, "upgrade-failed", outcome=UpgradeOutcome("timeout", 11, "late", 3.0))
        emit(self.graceful, "upgrade-ok", "draining", outcome=UpgradeOutcome("ok", 12, None, 1.2))
        self.assertEqual(self.value("graceful_reloads_total", result="failed"), 1)
        self.assertEqual(self.value("graceful_reloads_total", result="timeout"), 1)
        self.assertEqual(self.value("graceful_reloads_total", result="ok"), 1)
        # Only successful upgrades have a duration worth a histogram.
        self.assertEqual(self.value("graceful_upgrade_duration_seconds_count"), 1)
        self.assertEqual(self.value("graceful_upgrade_duration_seconds_sum"), 1.2)
        self.assertEqual(self.environ[RELOADS_ENV], "ok=1,failed=1,timeout=1")

    def test_reloads_carried_to_next_generation(self):
        environ = {RELOADS_ENV: "ok=2,failed=1,timeout=0"}
        inheritance = Inheritance({}, generation=3, parent_pid=77, source="inherited")
        graceful = make_service(environ, inheritance)
        graceful.acquire()
        metrics = GracefulMetrics(graceful)
        emit(graceful, "serving", source="inherited", parent_pid=77)
        value = metrics.registry.get_sample_value
        self.assertEqual(value("graceful_reloads_total", {"result": "ok"}), 3)
        self.assertEqual(value("graceful_reloads_total", {"result": "failed"}), 1)
        self.assertEqual(value("graceful_generation"), 3)
        self.assertEqual(environ[RELOADS_ENV], "ok=3,failed=1,timeout=0")

    def test_first_generation_ignores_stray_variable(self):
        environ = {RELOADS_ENV: "ok=9"}
        graceful = make_service(environ)
        metrics = GracefulMetrics(graceful)
        emit(graceful, "serving", source="bound")
        self.assertEqual(metrics.registry.get_sample_value("graceful_reloads_total",
                                                           {"result": "ok"}), 0)

    def test_drain_and_cut(self):
        report = DrainReport()
        report.duration = 2.5
        report.cut = ["txn connection", "http connection"]
        emit(self.graceful, "drained", "exited", report=report)
        self.assertEqual(self.value("graceful_drain_duration_seconds_count"), 1)
        self.assertEqual(self.value("graceful_drain_duration_seconds_sum"), 2.5)
        self.assertEqual(self.value("graceful_connections_cut_total"), 2)

    def test_previous_drain_imported_from_status_file(self):
        path = os.path.abspath(self.mktemp())
        pidfile = path + ".pid"
        update_status_file(pidfile + ".status.json", 77, {
            "pid": 77, "drain": {"duration_seconds": 4.0, "cut": 1}, "updated_at": 1,
            "last_upgrade": {"result": "ok", "child_pid": os.getpid(), "duration_seconds": 0.7}})
        inheritance = Inheritance({}, generation=2, parent_pid=77, source="inherited",
                                  pidfile=pidfile)
        graceful = make_service(inheritance=inheritance, pidfile=pidfile)
        metrics = GracefulMetrics(graceful)
        emit(graceful, "serving", source="inherited", parent_pid=77)
        value = metrics.registry.get_sample_value
        for _ in range(2):  # counted once, however many scrapes
            self.assertEqual(value("graceful_drain_duration_seconds_count"), 1)
            self.assertEqual(value("graceful_connections_cut_total"), 1)
            self.assertEqual(value("graceful_upgrade_duration_seconds_sum"), 0.7)

    def test_generation_and_state(self):
        self.assertEqual(self.value("graceful_generation"), 1)
        self.assertEqual(self.value("graceful_state", state="starting"), 1)
        emit(self.graceful, "serving", source="bound")
        self.assertEqual(self.value("graceful_state", state="serving"), 1)
        emit(self.graceful, "upgrade-started", "upgrading", child_pid=5151, reason="SIGHUP")
        self.assertEqual(self.value("graceful_state", state="upgrading"), 1)
        self.assertEqual(self.value("graceful_state", state="serving"), 0)
        self.graceful.lifecycle.generation = 4
        self.assertEqual(self.value("graceful_generation"), 4)

    def test_registries_are_separate(self):
        other = GracefulMetrics(make_service())
        emit(self.graceful, "upgrade-failed", outcome=UpgradeOutcome("failed", 1, "x", 0.1))
        self.assertEqual(other.registry.get_sample_value("graceful_reloads_total",
                                                         {"result": "failed"}), 0)

    def test_exposition_text(self):
        from prometheus_client import generate_latest

        FakeConnection(self.graceful.tracker)
        text = generate_latest(self.metrics.registry).decode()
        self.assertIn('graceful_open_connections{protocol="fake"} 1.0', text)
        self.assertIn('graceful_reloads_total{result="ok"} 0.0', text)
        self.assertIn("graceful_generation 1.0", text)


class StatusTests(unittest.TestCase):
    def setUp(self):
        self.graceful = make_service()
        self.status = ProcessStatus(self.graceful, clock=lambda: 1000.0)

    def render(self):
        request = DummyRequest([b""])
        body = StatusResource(self.status).render(request)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"),
                         [b"application/json"])
        return json.loads(body)

    def test_serving(self):
        emit(self.graceful, "serving", source="bound")
        doc = self.render()
        self.assertEqual(doc["pid"], os.getpid())
        self.assertEqual(doc["generation"], 1)
        self.assertEqual(doc["state"], "serving")
        self.assertEqual(doc["started_at"], 1000.0)
        self.assertIsNone(doc["child"])
        self.assertIsNone(doc["last_upgrade"])

    def test_upgrading_then_failed(self):
        emit(self.graceful, "serving", source="bound")
        emit(self.graceful, "upgrade-started", "upgrading", child_pid=5151, reason="SIGHUP")
        doc = self.render()
        self.assertEqual(doc["state"], "upgrading")
        self.assertEqual(doc["child"], {"pid": 5151, "since": 1000.0})
        emit(self.graceful, "upgrade-failed", outcome=UpgradeOutcome(
            "failed", 5151, "pid 5151 exited with status 1 before it was ready", 0.4,
            ["RuntimeError: broken"]))
        doc = self.render()
        self.assertEqual(doc["state"], "serving")
        self.assertIsNone(doc["child"])
        last = doc["last_upgrade"]
        self.assertEqual((last["result"], last["child_pid"], last["duration_seconds"]),
                         ("failed", 5151, 0.4))
        self.assertIn("exited with status 1", last["error"])
        self.assertEqual(last["output_tail"], ["RuntimeError: broken"])

    def test_handed_over_and_drained(self):
        emit(self.graceful, "upgrade-ok", "draining", outcome=UpgradeOutcome("ok", 99, None, 0.3))
        emit(self.graceful, "handed-over", "draining", child_pid=99, pidfile_error=None)
        doc = self.render()
        self.assertEqual(doc["state"], "draining")
        self.assertEqual(doc["last_upgrade"]["child_pid"], 99)
        report = DrainReport()
        report.duration = 0.25
        report.at_start = 3
        emit(self.graceful, "drained", "exited", report=report)
        doc = self.render()
        self.assertEqual(doc["state"], "exited")
        self.assertEqual(doc["drain"]["duration_seconds"], 0.25)
        self.assertEqual(doc["drain"]["connections_at_start"], 3)


class ServerViewTests(unittest.TestCase):
    def test_status_shows_every_live_process_of_the_server(self):
        pidfile = os.path.abspath(self.mktemp())
        update_status_file(pidfile + ".status.json", os.getpid(),
                           {"role": "master", "generation": 3, "state": "serving"})
        update_status_file(pidfile + ".status.json", 2 ** 22 + 5,  # never alive
                           {"role": "worker", "generation": 2, "state": "serving"})
        graceful = make_service(pidfile=pidfile)
        status = ProcessStatus(graceful, clock=lambda: 1000.0)
        emit(graceful, "serving", source="worker")
        request = DummyRequest([b""])
        doc = json.loads(StatusResource(status).render(request))
        self.assertEqual(doc["server"], {str(os.getpid()): {
            "role": "master", "generation": 3, "state": "serving"}})


class StatusFileTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pidfile = os.path.join(self.dir, "twistd.pid")
        self.path = self.pidfile + ".status.json"

    def test_written_on_every_event_next_to_pidfile(self):
        graceful = make_service(pidfile=self.pidfile)
        StatusFile(graceful)
        self.assertIsNone(read_status(self.path))
        emit(graceful, "serving", source="bound")
        entry = read_status(self.path)["processes"][str(os.getpid())]
        self.assertEqual(entry["state"], "serving")
        emit(graceful, "upgrade-started", "upgrading", child_pid=5151, reason="SIGHUP")
        entry = read_status(self.path)["processes"][str(os.getpid())]
        self.assertEqual((entry["state"], entry["child"]["pid"]), ("upgrading", 5151))
        self.assertEqual([n for n in os.listdir(self.dir) if n.endswith(".tmp")], [])

    def test_no_pidfile_no_file(self):
        graceful = make_service()
        StatusFile(graceful)
        emit(graceful, "serving", source="bound")
        self.assertEqual(os.listdir(self.dir), [])

    def test_generations_keep_their_own_entries(self):
        # The old generation's outcome and the new one's "serving", in
        # either order: neither overwrites the other.
        update_status_file(self.path, 200, {"state": "serving", "updated_at": 2})
        update_status_file(self.path, 100, {"state": "draining", "updated_at": 3})
        processes = read_status(self.path)["processes"]
        self.assertEqual(processes["100"]["state"], "draining")
        self.assertEqual(processes["200"]["state"], "serving")

    def test_old_entries_of_dead_processes_pruned(self):
        dead = []
        for n in range(12):
            pid = 2 ** 22 + 1000 + n  # above pid_max: never alive
            dead.append(pid)
            update_status_file(self.path, pid, {"updated_at": n}, keep=5)
        processes = read_status(self.path)["processes"]
        self.assertEqual(sorted(int(p) for p in processes), dead[-5:])

    def test_garbage_file_replaced(self):
        with open(self.path, "w") as f:
            f.write("{not json")
        self.assertIsNone(read_status(self.path))
        update_status_file(self.path, 1, {"state": "serving"})
        self.assertEqual(read_status(self.path)["processes"]["1"]["state"], "serving")
