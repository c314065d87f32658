"""
One view of the whole server: the workers of a master and the master itself
write their metrics into one directory (prometheus_client's multiprocess
mode), and C{/metrics} of any worker shows the sum. Without processes:
several fake "processes" in this one, each with its own pid for
prometheus_client (its own tests do the same: C{values.ValueClass} set to a
L{MultiProcessValue} with a fixed pid, C{PROMETHEUS_MULTIPROC_DIR} set).
"""

import atexit
import os

from prometheus_client import Counter, generate_latest, values
from prometheus_client.multiprocess import mark_process_dead
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from twisted_graceful import metrics as M
from twisted_graceful.drain import DrainReport
from twisted_graceful.handoff import HANDOFF_VARIABLES, WORKER
from twisted_graceful.http import GracefulSite
from twisted_graceful.inherit import Inheritance
from twisted_graceful.lifecycle import SERVING, STARTING, UpgradeOutcome
from twisted_graceful.master import MasterService
from twisted_graceful.service import GracefulService
from twisted_graceful.txn import TxnFactory

from tests.test_drain import FakeConnection
from tests.test_metrics import Page, emit
from tests.test_service import SpawningReactor
from tests.test_txn_protocol import FakeIdentity, FakeStore

MASTER_PID = 900


class SharedDirectoryTestCase(unittest.TestCase):
    """
    A temporary multiprocess directory, named in C{os.environ} as in a real
    worker; L{as_process} makes what follows write as the process C{pid}.
    """

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        previous = os.environ.get(M.MULTIPROC_ENV)
        os.environ[M.MULTIPROC_ENV] = self.dir

        def restore():
            if previous is None:
                os.environ.pop(M.MULTIPROC_ENV, None)
            else:
                os.environ[M.MULTIPROC_ENV] = previous

        self.addCleanup(restore)
        self.patch(values, "ValueClass", values.MutexValue)
        self.value_classes = {}

    def as_process(self, pid):
        """
        What follows writes as the process C{pid} (one value class per
        process, as in a real one: metrics it makes later, a new label
        value say, go to that process's files).
        """
        if pid not in self.value_classes:
            self.value_classes[pid] = values.MultiProcessValue(lambda: pid)
            # close_all_files came in prometheus_client 0.26; with an older
            # one the files stay mapped until the test process exits (each
            # test has its own directory, so nothing leaks into another).
            close = getattr(self.value_classes[pid], "close_all_files", None)
            if close is not None:
                self.addCleanup(close)
        values.ValueClass = self.value_classes[pid]

    def worker(self, pid, generation=1):
        """
        A worker of the master (never started): its service, site, txn
        factory and metrics, writing as C{pid}.
        """
        self.as_process(pid)
        inheritance = Inheritance({}, generation=generation, parent_pid=MASTER_PID,
                                  source="inherited", role=WORKER)
        graceful = GracefulService(Clock(), environ={M.MULTIPROC_ENV: self.dir},
                                   inheritance=inheritance, install_signal_handlers=False)
        graceful.acquire()
        self.assertEqual(M.worker_directory(graceful), self.dir)
        metrics = M.GracefulMetrics(graceful, shared_dir=M.worker_directory(graceful))
        site = metrics.observe_http_site(GracefulSite(Page(), drain_tracker=graceful.tracker,
                                                         reactor=Clock()))
        txn = metrics.observe_txn_factory(TxnFactory(
            FakeStore(), FakeIdentity(), Clock(), drain_tracker=graceful.tracker,
            emit=lambda line: None))
        metrics.test_site, metrics.test_txn = site, txn
        return graceful, metrics

    def serving(self, graceful):
        emit(graceful, "serving", source=WORKER, parent_pid=MASTER_PID, listeners={})

    def get(self, metrics, *paths):
        """
        Requests on one keep-alive connection to the worker's site.
        """
        channel = metrics.test_site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in paths))
        channel.connectionLost(None)
        return transport.value()

    def value(self, metrics, name, **labels):
        return metrics.registry.get_sample_value(name, labels)


class WorkerAggregationTests(SharedDirectoryTestCase):
    def test_requests_are_summed_over_every_worker(self):
        a_service, a = self.worker(1001)
        b_service, b = self.worker(1002)
        self.serving(a_service)
        self.serving(b_service)
        self.get(a, b"/", b"/", b"/missing")
        self.get(b, b"/", b"/")
        for metrics in (a, b):  # whichever worker answers the scrape
            self.assertEqual(self.value(metrics, "graceful_requests_total", protocol="http",
                                        result="2xx"), 4)
            self.assertEqual(self.value(metrics, "graceful_requests_total", protocol="http",
                                        result="4xx"), 1)
            self.assertEqual(self.value(metrics, "graceful_requests_total", protocol="http",
                                        result="5xx"), 0)

    def test_transactions_are_summed_over_every_worker(self):
        a_service, a = self.worker(1001)
        b_service, b = self.worker(1002)
        for metrics in (a, b):
            proto = metrics.test_txn.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
            proto.makeConnection(StringTransport())
            proto.dataReceived(b"BEGIN\r\nSET a 1\r\nCOMMIT\r\nBEGIN\r\nABORT\r\n")
            proto.connectionLost(None)
        self.assertEqual(self.value(b, "graceful_requests_total", protocol="txn",
                                    result="committed"), 2)
        self.assertEqual(self.value(a, "graceful_requests_total", protocol="txn",
                                    result="aborted"), 2)

    def test_counters_continue_when_a_worker_exits_and_another_starts(self):
        a_service, a = self.worker(1001)
        self.serving(a_service)
        self.get(a, b"/", b"/", b"/")
        mark_process_dead(1001, self.dir)  # what the master does when it exits
        c_service, c = self.worker(1003, generation=2)
        self.serving(c_service)
        self.assertEqual(self.value(c, "graceful_requests_total", protocol="http",
                                    result="2xx"), 3)
        self.get(c, b"/")
        self.assertEqual(self.value(c, "graceful_requests_total", protocol="http",
                                    result="2xx"), 4)

    def test_the_self_test_before_serving_is_not_a_request(self):
        # A worker accepts nothing before it is ready: what its site answers
        # meanwhile is its own readiness self-test.
        a_service, a = self.worker(1001)
        self.get(a, b"/healthz")
        self.assertEqual(self.value(a, "graceful_requests_total", protocol="http",
                                    result="2xx"), 0)
        self.serving(a_service)
        self.get(a, b"/")
        self.assertEqual(self.value(a, "graceful_requests_total", protocol="http",
                                    result="2xx"), 1)

    def test_open_connections_are_the_sum_over_live_workers(self):
        a_service, a = self.worker(1001)
        b_service, b = self.worker(1002)
        self.serving(a_service)
        self.serving(b_service)
        FakeConnection(a_service.tracker)
        busy = FakeConnection(a_service.tracker, busy=True)
        FakeConnection(b_service.tracker, busy=True)
        # Each worker writes its own share every LIVE_REFRESH_SECONDS, and
        # when it answers a scrape.
        self.as_process(1001)
        a_service.reactor.advance(M.LIVE_REFRESH_SECONDS)
        self.as_process(1002)
        b.snapshot()
        for metrics in (a, b):
            self.assertEqual(self.value(metrics, "graceful_open_connections", protocol="fake"), 3)
            self.assertEqual(
                self.value(metrics, "graceful_inflight_transactions", protocol="fake"), 2)
        busy.finish_transaction()
        self.as_process(1001)
        a.snapshot()
        self.assertEqual(self.value(b, "graceful_inflight_transactions", protocol="fake"), 1)
        mark_process_dead(1002, self.dir)
        self.assertEqual(self.value(a, "graceful_open_connections", protocol="fake"), 2)
        self.assertEqual(self.value(a, "graceful_inflight_transactions", protocol="fake"), 0)

    def test_every_worker_counts_its_own_drain(self):
        a_service, a = self.worker(1001)
        b_service, b = self.worker(1002)
        for service, duration, cut in ((a_service, 1.5, ["txn connection"]), (b_service, 0.5, [])):
            report = DrainReport()
            report.duration, report.cut = duration, cut
            emit(service, "drained", "exited", report=report)
        self.assertEqual(self.value(a, "graceful_drain_duration_seconds_count"), 2)
        self.assertEqual(self.value(a, "graceful_drain_duration_seconds_sum"), 2.0)
        self.assertEqual(self.value(b, "graceful_connections_cut_total"), 1)

    def test_exposition_has_one_series_per_label_set_and_no_pid(self):
        a_service, a = self.worker(1001)
        b_service, b = self.worker(1002)
        self.serving(a_service)
        self.serving(b_service)
        self.get(a, b"/")
        self.get(b, b"/")
        FakeConnection(b_service.tracker)
        b.snapshot()
        text = generate_latest(a.registry).decode()
        self.assertIn("# TYPE graceful_requests_total counter", text)
        self.assertIn('graceful_requests_total{protocol="http",result="2xx"} 2.0', text)
        self.assertIn('graceful_open_connections{protocol="fake"} 1.0', text)
        self.assertEqual(text.count('graceful_requests_total{protocol="http",result="2xx"}'), 1)
        self.assertNotIn("pid=", text)
        # Per-process collectors cannot be summed: not served in this mode.
        self.assertNotIn("process_cpu_seconds_total", text)
        # The master says which generation serves and in which state.
        self.assertNotIn("graceful_generation", text)

    def test_workers_never_count_reloads(self):
        # The master upgrades its workers, and counts the upgrades.
        a_service, a = self.worker(1001, generation=3)
        self.serving(a_service)
        self.assertIsNone(self.value(a, "graceful_reloads_total", result="ok"))
        self.assertNotIn(M.RELOADS_ENV, a_service.environ)


class MasterMetricsTests(SharedDirectoryTestCase):
    def setUp(self):
        SharedDirectoryTestCase.setUp(self)
        self.reactor = SpawningReactor()
        self.service = MasterService(self.reactor, {}, workers=2, environ={},
                                     install_signal_handlers=False, relay_output=False,
                                     command=("/bin/true", ["/bin/true"]))
        self.master = self.service.master
        self.as_process(MASTER_PID)
        self.shared = M.MasterMetrics(self.service, self.dir)

    def tell(self, event, state, **details):
        self.master.state = state
        self.master._tell(event, **details)

    def test_every_worker_gets_the_directory_in_its_environment(self):
        self.assertEqual(self.service.environ[M.MULTIPROC_ENV], self.dir)
        self.master.start()
        self.assertEqual(len(self.reactor.spawned), 2)
        for spawned in self.reactor.spawned:
            self.assertEqual(spawned["env"][M.MULTIPROC_ENV], self.dir)
        # An ordinary variable, not part of the handoff.
        self.assertNotIn(M.MULTIPROC_ENV, HANDOFF_VARIABLES)

    def test_upgrades_are_counted_by_the_master_and_seen_by_every_worker(self):
        self.tell("upgrade-ok", SERVING, outcome=UpgradeOutcome("ok", None, None, 1.25))
        self.tell("upgrade-failed", SERVING, outcome=UpgradeOutcome("timeout", None, "late", 30))
        self.tell("upgrade-failed", SERVING, outcome=UpgradeOutcome("failed", None, "exit", 0.2))
        _, worker = self.worker(1001)
        for result in M.RELOAD_RESULTS:
            self.assertEqual(self.value(worker, "graceful_reloads_total", result=result), 1)
        self.assertEqual(self.value(worker, "graceful_upgrade_duration_seconds_count"), 1)
        self.assertEqual(self.value(worker, "graceful_upgrade_duration_seconds_sum"), 1.25)

    def test_the_first_set_failing_is_not_a_reload(self):
        self.tell("upgrade-failed", STARTING, outcome=UpgradeOutcome("failed", None, "x", 0.1))
        _, worker = self.worker(1001)
        self.assertEqual(self.value(worker, "graceful_reloads_total", result="failed"), 0)

    def test_generation_and_state_are_the_masters(self):
        self.tell("serving", SERVING, source="master")
        _, worker = self.worker(1001)
        self.assertEqual(self.value(worker, "graceful_generation"), 1)
        self.assertEqual(self.value(worker, "graceful_state", state="serving"), 1)
        self.master.generation = 2
        self.tell("upgrade-started", "upgrading", child_pid=None, reason="SIGHUP")
        self.assertEqual(self.value(worker, "graceful_state", state="upgrading"), 1)
        self.assertEqual(self.value(worker, "graceful_state", state="serving"), 0)
        self.assertEqual(self.value(worker, "graceful_generation"), 2)
        text = generate_latest(worker.registry).decode()
        series = [line for line in text.splitlines() if line.startswith("graceful_generation")]
        self.assertEqual(series, ["graceful_generation 2.0"])  # one series, no pid label

    def test_replaced_workers_are_counted(self):
        self.tell("worker-exited", SERVING, worker_pid=1001, how="was killed by SIGKILL",
                  expected=False, replace_in=0)
        self.tell("worker-exited", SERVING, worker_pid=1002, how="exited with status 0",
                  expected=True)
        _, worker = self.worker(1003)
        self.assertEqual(self.value(worker, "graceful_worker_restarts_total"), 1)

    def test_a_worker_that_ends_is_marked_dead(self):
        a_service, a = self.worker(1001)
        b_service, b = self.worker(1002)
        self.serving(a_service)
        self.serving(b_service)
        self.get(a, b"/")
        FakeConnection(a_service.tracker)
        FakeConnection(a_service.tracker)
        FakeConnection(b_service.tracker)
        self.as_process(1002)
        b.snapshot()
        self.as_process(1001)
        a.snapshot()
        self.assertEqual(self.value(b, "graceful_open_connections", protocol="fake"), 3)

        class Ended:
            pid = 1001
            finished = True

        self.master.child_ended(Ended(), "was killed by SIGKILL")
        self.assertEqual(self.value(b, "graceful_open_connections", protocol="fake"), 1)
        self.assertEqual(self.value(b, "graceful_requests_total", protocol="http",
                                    result="2xx"), 1)

    def test_close_removes_the_directory(self):
        self.shared.close()
        self.assertFalse(os.path.exists(self.dir))
        self.shared.close()  # twice: at shutdown, then at exit


class MasterDirectoryTests(unittest.TestCase):
    def setUp(self):
        self.patch(values, "ValueClass", values.MutexValue)
        previous = os.environ.get(M.MULTIPROC_ENV)
        self.addCleanup(lambda: os.environ.__setitem__(M.MULTIPROC_ENV, previous)
                        if previous is not None else os.environ.pop(M.MULTIPROC_ENV, None))

    def install(self, environ):
        service = MasterService(SpawningReactor(), {}, workers=1, environ=environ,
                                install_signal_handlers=False)
        shared = M.install_master(service)
        self.addCleanup(atexit.unregister, shared.close)
        self.addCleanup(shared.close)
        return service, shared

    def test_a_private_directory_removed_at_shutdown(self):
        stray = os.path.abspath(self.mktemp())
        os.makedirs(stray)
        service, shared = self.install({M.MULTIPROC_ENV: stray})
        # Never someone else's directory, even one named in our environment.
        self.assertNotEqual(shared.directory, stray)
        self.assertTrue(os.path.isdir(shared.directory))
        self.assertEqual(service.environ[M.MULTIPROC_ENV], shared.directory)
        # This process writes there too.
        self.assertEqual(os.environ[M.MULTIPROC_ENV], shared.directory)
        self.assertTrue(values.ValueClass._multiprocess)
        after = service.reactor.triggers["after"]["shutdown"]
        self.assertIn(shared.close, [t[0] for t in after])
        shared.close()
        self.assertFalse(os.path.exists(shared.directory))
        self.assertTrue(os.path.isdir(stray))

    def test_a_reexecuted_master_keeps_its_directory(self):
        first_service, first = self.install({})
        service, shared = self.install({M.MULTIPROC_ENV: first.directory,
                                        "GRACEFUL_MASTER_EXECS": "1"})
        self.assertEqual(service.execs, 1)
        self.assertEqual(shared.directory, first.directory)


class DurableCountTests(SharedDirectoryTestCase):
    """
    A worker's request counts are in its file once the request is logged,
    before the response leaves (no reactor turn, no delayed call): a worker
    killed with SIGKILL right after loses none. They are written by
    L{M.mmaped_slot}'s shortcut, the same bytes C{Counter.inc} writes.
    """

    def count(self, metrics, result="2xx"):
        # What a scrape of any worker reads: the files, not this process's values.
        return self.value(metrics, "graceful_requests_total", protocol="http", result=result)

    def test_the_installed_prometheus_client_takes_the_shortcut(self):
        self.as_process(1001)
        child = Counter("graceful_requests", M.HELP_REQUESTS, ["protocol", "result"],
                        registry=None).labels("http", "2xx")
        slot = M.mmaped_slot(child)
        self.assertIsNotNone(slot)
        value, file, position = slot
        self.assertIs(value, child._value)
        # Where Counter.inc writes: after one, the file holds 1.0 there.
        child.inc()
        self.assertEqual(M.struct.unpack_from("dd", file._m, position), (1.0, 0.0))

    def test_every_request_is_in_the_file_at_once(self):
        a_service, a = self.worker(1001)
        self.serving(a_service)
        clock = a.test_site.reactor
        for n in range(1, 6):
            self.get(a, b"/")
            self.assertEqual(self.count(a), n)  # the clock never moved
        self.get(a, b"/missing")
        self.assertEqual(self.count(a, "4xx"), 1)
        self.assertEqual(self.count(a), 5)
        # Nothing waits to write them (only the head deadlines' call is armed).
        self.assertEqual([call.func.__name__ for call in clock.getDelayedCalls()], ["_expire"])

    def test_the_shortcut_and_inc_add_to_one_value(self):
        # The in-process value is kept too: a later inc() (or a prometheus
        # client that takes no shortcut) goes on from the count written.
        a_service, a = self.worker(1001)
        self.serving(a_service)
        self.get(a, b"/", b"/")
        self.as_process(1001)
        a.requests.labels("http", "2xx").inc()
        self.get(a, b"/")
        self.assertEqual(self.count(a), 4)

    def test_without_the_shortcut_inc_counts(self):
        self.patch(M, "mmaped_slot", lambda child: None)
        a_service, a = self.worker(1001)
        self.serving(a_service)
        self.get(a, b"/", b"/", b"/missing")
        self.assertEqual(self.count(a), 2)
        self.assertEqual(self.count(a, "4xx"), 1)

    def test_a_status_class_outside_the_five_is_counted(self):
        a_service, a = self.worker(1001)
        self.serving(a_service)
        request = type("R", (), {"code": 600})()
        a.test_site.log(request)
        self.assertEqual(self.count(a, "6xx"), 1)

    def test_not_multiprocess_no_shortcut(self):
        child = Counter("c", "h", registry=None)  # values.MutexValue (setUp)
        self.assertIsNone(M.mmaped_slot(child))


class SingleProcessModeTests(unittest.TestCase):
    """
    C{--workers 0}: the process serves alone and keeps its own registry,
    whatever its environment says.
    """

    def test_not_a_worker_no_shared_directory(self):
        environ = {M.MULTIPROC_ENV: os.path.abspath(self.mktemp())}
        os.makedirs(environ[M.MULTIPROC_ENV])
        graceful = GracefulService(Clock(), environ=environ, install_signal_handlers=False,
                                   inheritance=Inheritance({}, generation=2, parent_pid=7,
                                                           source="inherited"))
        graceful.acquire()
        self.assertIsNone(M.worker_directory(graceful))
        metrics = M.GracefulMetrics(graceful, shared_dir=M.worker_directory(graceful))
        self.assertIsNone(metrics.shared_dir)
        value = metrics.registry.get_sample_value
        self.assertEqual(value("graceful_generation"), 2)
        self.assertIsNotNone(value("process_cpu_seconds_total"))

    def test_a_worker_without_the_variable_keeps_its_own_registry(self):
        graceful = GracefulService(Clock(), environ={}, install_signal_handlers=False,
                                   inheritance=Inheritance({}, role=WORKER, parent_pid=7))
        graceful.acquire()
        self.assertIsNone(M.worker_directory(graceful))
