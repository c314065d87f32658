"""
HTTP channels that drain at request boundaries, over L{StringTransport}.
"""

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web import http, resource, server

from twisted_graceful._twisted import GenericHTTPChannelProtocol
from twisted_graceful.drain import DrainTracker
from twisted_graceful.hello import HelloResource
from twisted_graceful.http import DrainableHTTPChannel, GracefulSite

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
GET_HELD = b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n"


class Held(resource.Resource):
    isLeaf = True

    def __init__(self):
        resource.Resource.__init__(self)
        self.requests = []

    def render_GET(self, request):
        self.requests.append(request)
        return server.NOT_DONE_YET


class Identity:
    pid = 4242
    generation = 7
    draining = False

    def __str__(self):
        return f"pid {self.pid} (generation {self.generation})"


class DrainableChannelTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.tracker = DrainTracker(self.clock, idle_grace=1.0, progress_interval=0,
                                    clock=self.clock.seconds)
        self.identity = Identity()
        root = HelloResource(self.clock, self.identity, slow_every=0, emit=lambda m: None)
        self.held = Held()
        root.putChild(b"held", self.held)
        self.site = GracefulSite(root, drain_tracker=self.tracker, reactor=self.clock)

    def connect(self):
        proto = self.site.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def drain(self, **kw):
        results = []
        self.tracker.drain(**kw).addCallback(results.append)
        return results

    def test_connections_are_tracked_with_their_state(self):
        proto, transport = self.connect()
        self.assertEqual(self.tracker.counts(), {"http": (1, 0)})
        proto.dataReceived(GET_HELD)
        self.assertEqual(self.tracker.counts(), {"http": (1, 1)})
        self.held.requests[0].finish()
        self.assertEqual(self.tracker.counts(), {"http": (1, 0)})
        proto.connectionLost(None)
        self.assertEqual(self.tracker.counts(), {})

    def test_keep_alive_without_drain(self):
        proto, transport = self.connect()
        proto.dataReceived(GET)
        self.assertIn(b"hello world from pid 4242 (generation 7)", transport.value())
        self.assertNotIn(b"Connection: close", transport.value())
        self.assertFalse(transport.disconnecting)

    def test_request_in_flight_finishes_with_connection_close(self):
        proto, transport = self.connect()
        proto.dataReceived(GET_HELD)
        results = self.drain()
        self.assertFalse(transport.disconnecting)
        self.assertEqual(results, [])
        request = self.held.requests[0]
        request.write(b"the whole answer")
        request.finish()
        self.assertIn(b"Connection: close", transport.value())
        self.assertIn(b"the whole answer", transport.value())
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(results[0].closed_by_server, 1)

    def test_pipelined_request_after_the_boundary_is_not_executed(self):
        proto, transport = self.connect()
        proto.dataReceived(GET_HELD + GET)
        self.drain()
        self.held.requests[0].finish()
        self.assertNotIn(b"hello world", transport.value())
        self.assertEqual(transport.value().count(b"HTTP/1.1 200"), 1)

    def test_bytes_after_a_connection_close_request_are_never_parsed(self):
        # Closed at once (nothing followed the request), as a TLS transport
        # may still deliver what the peer sent after it: dropped, not a
        # second request on a closing connection.
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        proto.dataReceived(GET)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200"), 1)
        self.assertEqual(self.tracker.counts(), {"http": (1, 0)})
        proto.connectionLost(None)
        self.assertEqual(self.tracker.counts(), {})

    def test_idle_connection_gets_a_grace_then_closes(self):
        proto, transport = self.connect()
        proto.dataReceived(GET)
        transport.clear()
        self.drain()
        self.clock.advance(0.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_request_within_the_grace_is_answered_with_connection_close(self):
        proto, transport = self.connect()
        self.drain()
        self.clock.advance(0.5)
        proto.dataReceived(GET)
        self.assertIn(b"hello world", transport.value())
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_hard_deadline_aborts_a_stuck_request(self):
        proto, transport = self.connect()
        proto.dataReceived(GET_HELD)
        results = self.drain(timeout=10, abort_grace=5)
        self.clock.advance(10)
        self.clock.advance(5)
        self.assertTrue(transport.disconnecting or getattr(transport, "aborting", False))
        self.assertEqual(len(results[0].cut), 1)
        self.assertIn("http connection", results[0].cut[0])

    def test_hard_deadline_waits_for_a_request_whose_commit_is_in_the_store(self):
        proto, transport = self.connect()
        proto.dataReceived(GET_HELD)
        request = self.held.requests[0]
        request.committing = True
        results = self.drain(timeout=10, abort_grace=5)
        self.clock.advance(10)
        self.clock.advance(5)
        self.assertFalse(getattr(transport, "aborting", False) or transport.disconnecting)
        request.committing = False
        request.write(b"committed txid=7")
        request.finish()
        self.assertIn(b"committed txid=7", transport.value())
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(results[0].cut, [])

    def test_healthz_says_draining(self):
        proto, transport = self.connect()
        proto.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        self.assertIn(b"serving pid 4242", transport.value())
        self.identity.draining = True
        proto2, transport2 = self.connect()
        proto2.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"503", transport2.value())
        self.assertIn(b"draining", transport2.value())


class HelloTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.lines = []
        self.root = HelloResource(self.clock, Identity(), slow_every=3, slow_seconds=2,
                                  emit=self.lines.append)
        self.site = GracefulSite(self.root, reactor=self.clock)

    def get(self, path=b"/"):
        proto = self.site.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"GET " + path + b" HTTP/1.0\r\n\r\n")
        return transport

    def test_every_nth_request_is_slow_with_heartbeats(self):
        self.get(), self.get()
        slow = self.get()
        self.assertEqual(slow.value(), b"")
        self.clock.advance(1)
        self.assertIn("pid 4242: slow request #1 1/2 s", self.lines)
        self.clock.advance(1)
        self.assertIn(b"after a slow request of 2", slow.value())
        self.assertIn("pid 4242: slow request #1 done", self.lines)

    def test_slow_on_demand_and_bad_seconds(self):
        t = self.get(b"/slow?seconds=0")
        self.clock.advance(0)
        self.assertIn(b"slow request of 0.0 s", t.value())
        bad = self.get(b"/slow?seconds=forever")
        self.assertIn(b"400", bad.value())
        self.assertIn(b"seconds must be a number", bad.value())

    def test_unknown_path_is_404(self):
        self.assertIn(b"404", self.get(b"/nope").value())


class AttributeNamesTests(unittest.SynchronousTestCase):
    """
    CPython keeps the attribute names of a class's instances in one shared
    table of at most 30 names (3.11 to 3.13); an instance that sets more
    gets a dict of its own, and every attribute access on it, Twisted's
    included, costs more (10,000 instructions per request here). HTTPChannel
    already sets 26 over a request: the drainable channel may add three.
    """

    def names_set(self, base, site):
        seen = set()

        class Recording(base):
            def __setattr__(self, name, value):
                seen.add(name)
                base.__setattr__(self, name, value)

        site.protocol = lambda: GenericHTTPChannelProtocol(Recording())
        proto = site.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(GET + GET)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 200"), 3)
        proto.connectionLost(None)
        return seen

    def test_at_most_three_more_attributes_than_a_bare_channel(self):
        clock = Clock()
        root = HelloResource(clock, Identity(), slow_every=0, emit=lambda m: None)
        bare = self.names_set(http.HTTPChannel, server.Site(root, reactor=clock))
        graceful = self.names_set(
            DrainableHTTPChannel,
            GracefulSite(root, drain_tracker=DrainTracker(clock), reactor=clock))
        self.assertLessEqual(len(graceful - bare), 3, sorted(graceful - bare))
        self.assertLessEqual(len(graceful), 30, sorted(graceful))
