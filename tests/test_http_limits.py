"""
HTTP requests that are too big, too long or too slow, over L{StringTransport}
with a L{Clock}: each gets its status code and a sentence, before the body is
read into memory; and a request whose head is not complete has not started,
so it never holds a draining generation.
"""

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource

from twisted_graceful.drain import TRANSACTION, DrainTracker
from twisted_graceful.http import GracefulSite

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class Echo(resource.Resource):
    """
    C{POST}: the size of the body it got; C{GET}: ok.
    """

    isLeaf = True

    def __init__(self):
        resource.Resource.__init__(self)
        self.bodies = []

    def render_GET(self, request):
        return b"ok\n"

    def render_POST(self, request):
        body = request.content.read()
        self.bodies.append(body)
        return b"got %d bytes\n" % len(body)


class LimitsTestCase(unittest.SynchronousTestCase):
    site_kwargs = {}

    def setUp(self):
        self.clock = Clock()
        self.tracker = DrainTracker(self.clock, idle_grace=1.0, progress_interval=0,
                                    clock=self.clock.seconds)
        self.resource = Echo()
        self.site = GracefulSite(self.resource, drain_tracker=self.tracker, reactor=self.clock,
                                 **self.site_kwargs)

    def connect(self):
        proto = self.site.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        # As the reactor would: a request's body (a temporary file once it
        # may be large) is closed with the connection, not left to the GC.
        self.addCleanup(proto.connectionLost, Failure(ConnectionDone()))
        return proto, transport

    def status(self, transport):
        head = transport.value().split(b"\r\n", 1)[0]
        return int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else None

    def assertRefused(self, transport, code, *fragments):
        self.assertEqual(self.status(transport), code, transport.value()[:300])
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertIn(b"connection: close", head.lower())
        text = body.decode()
        self.assertTrue(text.endswith("\n") and text.count("\n") == 1, text)
        for fragment in fragments:
            self.assertIn(fragment, text)
        self.assertTrue(transport.disconnecting)


class BodyLimitTests(LimitsTestCase):
    site_kwargs = {"max_body": 1000}

    def post(self, size, extra=b""):
        return (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % size + extra
                + b"\r\n")

    def test_body_within_the_limit(self):
        proto, transport = self.connect()
        proto.dataReceived(self.post(1000) + b"x" * 1000)
        self.assertEqual(self.status(transport), 200)
        self.assertEqual(len(self.resource.bodies[0]), 1000)

    def test_content_length_over_the_limit_is_413_before_the_body(self):
        proto, transport = self.connect()
        proto.dataReceived(self.post(52428800))  # the head only: no byte of the body yet
        self.assertRefused(transport, 413, "1000 bytes")
        proto.dataReceived(b"x" * 100000)  # what follows is dropped, not buffered
        self.assertEqual(self.resource.bodies, [])

    def test_expect_100_continue_over_the_limit_gets_413_not_100(self):
        proto, transport = self.connect()
        proto.dataReceived(self.post(5000, b"Expect: 100-continue\r\n"))
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertRefused(transport, 413)

    def test_chunked_body_over_the_limit_is_413(self):
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        content = proto._channel.requests[0].content
        for _ in range(3):
            proto.dataReceived(b"1f4\r\n" + b"x" * 500 + b"\r\n")
        proto.dataReceived(b"0\r\n\r\n")
        self.assertRefused(transport, 413)
        self.assertEqual(self.resource.bodies, [])
        # What was received is dropped at once, not kept until the
        # connection is gone (a chunked body goes to a temporary file).
        self.assertTrue(content.closed)

    def test_default_limit_is_64_kib(self):
        site = GracefulSite(self.resource, reactor=self.clock)
        self.assertEqual(site.max_body, 64 * 1024)


class HeadLimitTests(LimitsTestCase):
    def test_over_long_request_line_is_414(self):
        proto, transport = self.connect()
        proto.dataReceived(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertRefused(transport, 414)

    def test_over_long_request_line_without_newline_is_414(self):
        proto, transport = self.connect()
        proto.dataReceived(b"GET /" + b"a" * 20000)
        self.assertRefused(transport, 414)

    def test_over_long_header_line_is_431(self):
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n")
        self.assertRefused(transport, 431)

    def test_header_block_too_big_is_431(self):
        proto, transport = self.connect()
        headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        self.assertRefused(transport, 431)

    def test_too_many_headers_is_431(self):
        proto, transport = self.connect()
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(600))
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        self.assertRefused(transport, 431)


class HeaderTimeoutTests(LimitsTestCase):
    site_kwargs = {"header_timeout": 10.0}

    def test_slow_head_gets_408(self):
        proto, transport = self.connect()
        for _ in range(5):  # a header byte every 3 s: each one resets an idle timer
            proto.dataReceived(b"G")
            self.clock.advance(3)
        self.assertRefused(transport, 408, "10")

    def test_complete_head_in_time_is_served(self):
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(9)
        proto.dataReceived(b"Host: x\r\n\r\n")
        self.assertEqual(self.status(transport), 200)
        self.clock.advance(60)
        self.assertNotIn(b"408", transport.value())

    def test_next_request_on_a_keep_alive_connection_has_its_own_clock(self):
        proto, transport = self.connect()
        proto.dataReceived(GET)
        self.clock.advance(30)  # idle between requests: not a slow head
        self.assertFalse(transport.disconnecting)
        transport.clear()
        proto.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(10)
        self.assertRefused(transport, 408)

    def test_connection_that_sends_nothing_is_closed_without_a_response(self):
        proto, transport = self.connect()
        self.clock.advance(10)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)


class PartialRequestDrainTests(LimitsTestCase):
    def test_partial_head_is_not_inside_a_transaction(self):
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
        self.assertEqual(self.tracker.counts(), {"http": (1, 0)})

    def test_partial_head_is_closed_after_the_idle_grace(self):
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nX-Slow: ")
        self.tracker.drain(TRANSACTION, timeout=60)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.0)
        self.assertRefused(transport, 408)

    def test_head_completed_within_the_grace_is_answered_and_closed(self):
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\n")
        self.tracker.drain(TRANSACTION, timeout=60)
        proto.dataReceived(b"Host: x\r\n\r\n")
        self.assertEqual(self.status(transport), 200)
        self.assertIn(b"connection: close", transport.value().lower())
        self.assertTrue(transport.disconnecting)

    def test_body_in_progress_is_inside_a_transaction(self):
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        self.assertEqual(self.tracker.counts(), {"http": (1, 1)})
