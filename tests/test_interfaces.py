"""
The extension points (L{twisted_graceful.interfaces}): the project's own
implementations provide them (checked with zope.interface's C{verifyObject},
as Twisted checks its own), a third-party class that implements an interface
without the project's base classes is drained like any other, and a hook
that cannot be called is refused when it is added, with a sentence.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.test.proto_helpers import StringTransport
from twisted.trial import unittest
from twisted.web import resource
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from twisted_graceful import http as graceful_http
from twisted_graceful import master as M
from twisted_graceful.drain import DrainableConnection, DrainTracker
from twisted_graceful.http import DrainableHTTPChannel, GracefulSite, HTTPSelfTest
from twisted_graceful.interfaces import (
    IDrainableConnection,
    ILifecycleObserver,
    IReadinessCheck,
)
from twisted_graceful.notify import SdNotifier
from twisted_graceful.service import GracefulService
from twisted_graceful.txn import TxnFactory, TxnProtocol

from tests.test_drain import FakeConnection
from tests.test_notify import FakeConn


@implementer(IDrainableConnection)
class ThirdPartyConnection:
    """
    A connection written against the interface alone (no
    L{DrainableConnection}): idle until C{busy}, closes itself when asked.
    """

    protocol_name = "third-party"
    drain_state = "open"
    transport = None

    def __init__(self, tracker, busy=False):
        self.tracker = tracker
        self.busy = busy
        self.closed = False
        self.close_requested = False
        tracker.add(self)

    def in_transaction(self):
        return self.busy

    def close_at_boundary(self, idle_grace):
        self.close_requested = True
        if not self.busy:
            self.close()

    def finish(self):
        self.busy = False
        if self.close_requested:
            self.close()

    def close(self):
        self.closed = True
        self.tracker.remove(self)

    def abort_connection(self):
        self.drain_state = "aborted"
        self.close()
        return True

    def describe(self):
        return "third-party connection (busy)" if self.busy else "third-party connection (idle)"


class ProvidedTests(unittest.SynchronousTestCase):
    def test_the_base_class_implements_the_connection_interface(self):
        verifyClass(IDrainableConnection, DrainableConnection)

    def test_an_http_channel_provides_it(self):
        site = GracefulSite(resource.Resource(), drain_tracker=DrainTracker(Clock()))
        proxy = site.buildProtocol(None)
        channel = proxy._channel
        self.assertIsInstance(channel, DrainableHTTPChannel)
        verifyObject(IDrainableConnection, channel)

    def test_a_transaction_connection_provides_it(self):
        factory = TxnFactory(store=None, identity=None, reactor=Clock())
        connection = factory.buildProtocol(None)
        self.assertIsInstance(connection, TxnProtocol)
        verifyObject(IDrainableConnection, connection)

    def test_the_test_fakes_provide_it(self):
        verifyObject(IDrainableConnection, FakeConnection(DrainTracker(Clock())))
        verifyObject(IDrainableConnection, FakeConn())

    def test_the_http_self_test_is_a_readiness_check(self):
        check = HTTPSelfTest(Clock(), GracefulSite(resource.Resource()))
        verifyObject(IReadinessCheck, check)

    def test_the_systemd_notifier_is_an_observer(self):
        verifyObject(ILifecycleObserver, SdNotifier(object(), send=lambda message: None))


class ThirdPartyConnectionTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.tracker = DrainTracker(self.clock, idle_grace=1.0, clock=self.clock.seconds)

    def test_is_counted_and_drained_at_its_boundary(self):
        idle = ThirdPartyConnection(self.tracker)
        busy = ThirdPartyConnection(self.tracker, busy=True)
        verifyObject(IDrainableConnection, idle)
        self.assertEqual(self.tracker.counts(), {"third-party": (2, 1)})
        reports = []
        self.tracker.drain(timeout=60, abort_grace=5).addCallback(reports.append)
        self.assertTrue(idle.closed)
        self.assertFalse(busy.closed)
        self.assertEqual(reports, [])
        busy.finish()
        self.assertTrue(busy.closed)
        self.assertEqual(len(reports), 1)
        self.assertEqual(reports[0].closed_by_server, 2)
        self.assertEqual(reports[0].cut, [])

    def test_is_cut_at_the_deadline(self):
        busy = ThirdPartyConnection(self.tracker, busy=True)
        reports = []
        self.tracker.drain(timeout=10, abort_grace=5).addCallback(reports.append)
        self.clock.advance(10)
        self.assertFalse(busy.closed)
        self.clock.advance(5)
        self.assertTrue(busy.closed)
        self.assertEqual(busy.drain_state, "aborted")
        self.assertEqual(reports[0].cut, ["third-party connection (busy)"])

    def test_an_object_that_does_not_provide_it_is_refused_with_a_sentence(self):
        class NotAConnection:
            protocol_name = "x"

            def in_transaction(self):
                return False

        error = self.assertRaises(TypeError, self.tracker.add, NotAConnection())
        self.assertIn("does not provide IDrainableConnection", str(error))
        self.assertIn("NotAConnection", str(error))
        self.assertEqual(len(self.tracker), 0)


class HookTests(unittest.SynchronousTestCase):
    def service(self):
        return GracefulService(Clock(), environ={"PATH": "/bin"}, install_signal_handlers=False,
                               relay_output=False)

    def test_a_readiness_check_that_cannot_be_called_is_refused(self):
        service = self.service()
        error = self.assertRaises(TypeError, service.add_readiness_check, "store.check")
        self.assertEqual(str(error), "'store.check' is not callable: expected an "
                                     "IReadinessCheck (a function or an object with __call__)")
        self.assertEqual(service.readiness_checks, [])

    def test_an_observer_that_cannot_be_called_is_refused(self):
        service = self.service()
        error = self.assertRaises(TypeError, service.add_observer, None)
        self.assertIn("expected an ILifecycleObserver", str(error))
        self.assertEqual(service.lifecycle.observers, [])

    def test_a_masters_observer_that_cannot_be_called_is_refused(self):
        master = M.MasterService(Clock(), {}, workers=1, environ={"PATH": "/bin"},
                                 install_signal_handlers=False, relay_output=False,
                                 command=("/usr/bin/python3", ["python3"]))
        before = list(master.master.observers)
        error = self.assertRaises(TypeError, master.add_observer, 3)
        self.assertIn("expected an ILifecycleObserver", str(error))
        self.assertEqual(master.master.observers, before)

    def test_a_plain_function_is_a_check_and_an_observer(self):
        service = self.service()
        heard = []
        service.add_observer(lambda event, **details: heard.append(event))
        service.add_readiness_check(lambda: defer.succeed(None))
        service.lifecycle.ready("bound")
        self.assertEqual(heard, ["serving"])
        self.assertEqual(len(service.readiness_checks), 1)

    def test_the_http_self_test_answers_through_a_real_request(self):
        # The check's own work is self_test_request's (tests.test_http); here,
        # that calling the check starts that request with its arguments.
        calls = []
        check = HTTPSelfTest("reactor", "site", path=b"/ready", timeout=3.0)
        self.patch(graceful_http, "self_test_request",
                   lambda *args: calls.append(args) or defer.succeed(b"HTTP/1.0 200 OK"))
        result = self.successResultOf(check())
        self.assertEqual(result, b"HTTP/1.0 200 OK")
        self.assertEqual(calls, [("reactor", "site", b"/ready", 3.0)])


class ConnectedTests(unittest.SynchronousTestCase):
    def test_a_connected_txn_connection_still_provides_it(self):
        factory = TxnFactory(store=None, identity=type("I", (), {"pid": 1, "generation": 1})(),
                             reactor=Clock())
        connection = factory.buildProtocol(None)
        connection.makeConnection(StringTransport())
        verifyObject(IDrainableConnection, connection)
        self.assertEqual(connection.describe().split(" ")[0], "txn")
