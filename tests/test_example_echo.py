"""
The example echo server (examples/echo/echo.py), one connection at a time
over a StringTransport: its replies, its transaction boundary, how it closes
when drained, and that it provides the interfaces it plugs in through.
"""

import importlib.util
import os

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from twisted_graceful.drain import DrainTracker
from twisted_graceful.interfaces import IDrainableConnection, IReadinessCheck

from tests.e2e import REPO

EXAMPLE = os.path.join(REPO, "examples", "echo", "echo.py")


def load_example():
    spec = importlib.util.spec_from_file_location("examples_echo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


echo = load_example()


class HalfClosingTransport(StringTransport):
    """
    A StringTransport that records the half-close (close_in_stages asks for
    one when the transport has a stream socket).
    """

    class socket:
        import socket as _socket
        type = _socket.SOCK_STREAM

    half_closed = False

    def loseWriteConnection(self):
        self.half_closed = True


class EchoProtocolTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.tracker = DrainTracker(self.clock, clock=self.clock.seconds)
        self.factory = echo.EchoFactory(self.clock, self.tracker, lambda: 7, pid=4242)

    def connect(self):
        connection = self.factory.buildProtocol(None)
        transport = HalfClosingTransport()
        connection.makeConnection(transport)
        return connection, transport

    def lines(self, transport):
        return transport.value().decode().splitlines()

    def test_provides_the_drainable_connection_interface(self):
        connection, _ = self.connect()
        verifyObject(IDrainableConnection, connection)

    def test_greets_and_echoes_a_message(self):
        connection, transport = self.connect()
        connection.dataReceived(b"hello\nworld\r\n.\n")
        self.assertEqual(self.lines(transport), [
            "220 echo ready, pid 4242 generation 7",
            "> hello", "> world",
            "250 echoed 2 line(s) by pid 4242 generation 7"])

    def test_a_message_is_a_transaction(self):
        connection, _ = self.connect()
        self.assertFalse(connection.in_transaction())
        connection.dataReceived(b"hello\n")
        self.assertTrue(connection.in_transaction())
        self.assertEqual(self.tracker.counts(), {"echo": (1, 1)})
        connection.dataReceived(b".\n")
        self.assertFalse(connection.in_transaction())

    def test_an_idle_connection_closes_at_once_when_drained(self):
        connection, transport = self.connect()
        self.tracker.drain()
        self.assertEqual(self.lines(transport)[-1],
                         "421 pid 4242 generation 7 draining, reconnect")
        self.assertTrue(transport.half_closed)
        # What the client sent after the 421 is not answered.
        connection.dataReceived(b"late\n.\n")
        self.assertEqual(len(self.lines(transport)), 2)

    def test_a_busy_connection_finishes_its_message_first(self):
        connection, transport = self.connect()
        connection.dataReceived(b"first line\n")
        self.tracker.drain()
        self.assertFalse(transport.half_closed)
        connection.dataReceived(b"second line\n.\nnext message\n.\n")
        self.assertEqual(self.lines(transport)[1:], [
            "> first line", "> second line",
            "250 echoed 2 line(s) by pid 4242 generation 7",
            "421 pid 4242 generation 7 draining, reconnect"])
        self.assertTrue(transport.half_closed)

    def test_closed_connections_leave_the_tracker(self):
        connection, _ = self.connect()
        self.assertEqual(len(self.tracker), 1)
        connection.connectionLost(None)
        self.assertEqual(len(self.tracker), 0)

    def test_an_overlong_line_is_refused_with_a_sentence(self):
        connection, transport = self.connect()
        connection.dataReceived(b"x" * 5000 + b"\n")
        self.assertEqual(self.lines(transport)[-1],
                         "500 a line holds at most 4096 bytes; closing")
        self.assertTrue(transport.half_closed)

    def test_a_message_that_never_ends_is_refused(self):
        connection, transport = self.connect()
        connection.dataReceived(b"line\n" * (echo.MAX_LINES + 1))
        self.assertEqual(self.lines(transport)[-1],
                         f"500 a message holds at most {echo.MAX_LINES} lines; closing")
        self.assertEqual(len(self.lines(transport)), 2)


class EchoSelfTestTests(unittest.SynchronousTestCase):
    def test_is_a_readiness_check_that_echoes_through_the_protocol(self):
        clock = Clock()
        tracker = DrainTracker(clock)
        check = echo.EchoSelfTest(clock, echo.EchoFactory(clock, tracker, lambda: 3, pid=1))
        verifyObject(IReadinessCheck, check)
        self.assertEqual(self.successResultOf(check()),
                         "250 echoed 1 line(s) by pid 1 generation 3")
        # The self-test's connection is not one to drain.
        self.assertEqual(len(tracker), 0)
