"""
TLS listeners' pieces: C{--tls-port} parsing (Twisted's C{ssl:} keywords),
loading a certificate with an error that names the file at fault, and a
TLS connection closed at a drain with a close_notify (not a TCP half-close
under it).
"""

import os
import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_graceful.drain import close_in_stages
from twisted_graceful.listeners import TLS, ListenerError, parse_listen_description
from twisted_graceful.tls import CertificateError, load_certificate, tls_factory

from tests.certs import write_certificate


def tls_spec(description):
    return parse_listen_description(description, "--tls-port", TLS)


class ParseTests(SynchronousTestCase):
    def test_twisted_keywords_are_kept_for_the_certificate(self):
        spec = tls_spec("ssl:8443:privateKey=k.pem:certKey=c.pem:interface=127.0.0.1")
        self.assertEqual((spec.kind, spec.host, spec.port), ("ssl", "127.0.0.1", 8443))
        self.assertEqual(dict(spec.tls), {"privateKey": "k.pem", "certKey": "c.pem"})
        self.assertEqual(spec.expects, (socket.AF_INET, socket.SOCK_STREAM))

    def test_a_number_is_ssl(self):
        self.assertEqual(tls_spec("8443").kind, "ssl")

    def test_systemd_socket_with_keywords(self):
        spec = tls_spec("systemd:https:privateKey=k.pem:certKey=c.pem")
        self.assertEqual((spec.kind, spec.name, dict(spec.tls)["certKey"]),
                         ("systemd", "https", "c.pem"))

    def test_tls_keywords_are_refused_elsewhere(self):
        error = self.assertRaises(ListenerError, parse_listen_description,
                                  "tcp:8080:privateKey=k.pem", "--port")
        self.assertIn("unknown parameter(s) privateKey", str(error))

    def test_not_ssl(self):
        error = self.assertRaises(ListenerError, tls_spec, "tcp:8443")
        self.assertIn("--tls-port 'tcp:8443': unsupported listener type 'tcp'", str(error))


class LoadTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cert, self.key = self.path("cert.pem"), self.path("key.pem")
        self.fingerprint = write_certificate(self.cert, self.key, "example.test")

    def path(self, name):
        return os.path.join(self.dir, name)

    def load(self, key=None, cert=None):
        return load_certificate(tls_spec(f"ssl:0:privateKey={key or self.key}:"
                                         f"certKey={cert or self.cert}"))

    def assertRefused(self, *fragments, **files):
        error = self.assertRaises(CertificateError, self.load, **files)
        self.assertIn("--tls-port ssl:0:", str(error))
        for fragment in fragments:
            self.assertIn(fragment, str(error))
        self.assertNotIn("\n", str(error))

    def test_loads_and_describes(self):
        loaded = self.load()
        self.assertIsInstance(loaded.context_factory, CertificateOptions)
        described = loaded.as_dict()
        self.assertEqual(described["subject"], "CN=example.test")
        self.assertEqual(described["sha256"], self.fingerprint)
        self.assertEqual(described["certificate"], self.cert)
        self.assertRegex(described["not_after"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

    def test_key_and_certificate_in_one_file(self):
        both = self.path("both.pem")
        with open(both, "wb") as f:
            f.write(open(self.cert, "rb").read() + open(self.key, "rb").read())
        loaded = load_certificate(tls_spec(f"ssl:0:privateKey={both}"))
        self.assertEqual(loaded.sha256, self.fingerprint)

    def test_missing_file(self):
        self.assertRefused(f"cannot read the private key (privateKey={self.path('no.pem')})",
                           "No such file", key=self.path("no.pem"))

    def test_broken_certificate(self):
        broken = self.path("broken.pem")
        with open(broken, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        self.assertRefused(f"certKey={broken} is not a PEM certificate", cert=broken)

    def test_certificate_given_as_key(self):
        self.assertRefused(f"privateKey={self.cert} is not a PEM private key", key=self.cert)

    def test_key_that_does_not_match(self):
        other_key = self.path("other-key.pem")
        write_certificate(self.path("other.pem"), other_key, "other")
        self.assertRefused(f"the private key (privateKey={other_key}) does not match the "
                           f"certificate (certKey={self.cert})", key=other_key)


class _Hold(protocol.Protocol):
    """
    The server side: closes in stages as a draining channel does.
    """

    def connectionMade(self):
        self.factory.connections.append(self)


class _Client(protocol.Protocol):
    def __init__(self):
        self.closed = defer.Deferred()
        self.received = b""

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(reason.value)


class CloseInStagesTests(TestCase):
    """
    A draining TLS connection closes with a close_notify: the client sees a
    clean TLS end (not a TLS stream cut by a bare FIN) and what was written
    before arrives.
    """

    @defer.inlineCallbacks
    def test_tls_connection_closes_with_close_notify(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert, key = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
        write_certificate(cert, key, "drain.test")
        loaded = load_certificate(tls_spec(f"ssl:0:privateKey={key}:certKey={cert}"))
        server = protocol.Factory.forProtocol(_Hold)
        server.connections = []
        port = reactor.listenTCP(0, tls_factory(loaded, server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        from twisted.internet.ssl import CertificateOptions as ClientOptions
        from twisted.protocols.tls import TLSMemoryBIOFactory

        client = _Client()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        yield endpoint.connect(TLSMemoryBIOFactory(
            ClientOptions(), True, protocol.Factory.forProtocol(lambda: client)))
        client.transport.write(b"hello")  # the handshake happens
        while not server.connections:
            yield _tick()
        held = server.connections[0]
        held.transport.write(b"last reply")
        delayed = close_in_stages(held.transport, reactor.callLater, linger=5)
        self.addCleanup(lambda: delayed.active() and delayed.cancel())
        reason = yield client.closed
        self.assertEqual(client.received, b"last reply")
        self.assertIsInstance(reason, ConnectionDone)  # a clean close_notify end


def _tick():
    d = defer.Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d



class LibraryTests(TestCase):
    """
    C{GracefulService.add_listener(..., role=TLS)} without a certificate
    given: the service loads it when it starts, serves the factory over TLS
    with it, and a certificate that cannot be used stops the generation
    before it serves (it gives up, as when not ready).
    """

    def start(self, cert_name="cert.pem"):
        from twisted_graceful.inherit import Inheritance
        from twisted_graceful.service import GracefulService

        from tests.test_service import SpawningReactor

        class Recording(SpawningReactor):
            factories = []

            def adoptStreamPort(self, fileno, family, factory):
                self.factories.append(factory)
                return SpawningReactor.adoptStreamPort(self, fileno, family, factory)

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        write_certificate(os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem"),
                          "library.test")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        self.addCleanup(sock.close)
        self.reactor = Recording()
        service = GracefulService(
            self.reactor, environ={}, inheritance=Inheritance({"https": sock}, source="bound"),
            install_signal_handlers=False, relay_output=False)
        self.given_up = []

        def give_up(status, why):
            self.given_up.append((status, why))
            raise _GaveUp(why)

        service._give_up = give_up
        service.add_listener("https", f"ssl:0:privateKey={directory}/key.pem:"
                                      f"certKey={directory}/{cert_name}:interface=127.0.0.1",
                             protocol.Factory(), role=TLS)
        self.addCleanup(lambda: [os.close(p.fileno()) for p in self.reactor.ports])
        self.addCleanup(lambda: service.lineage and service.lineage.close())
        return service

    def test_loads_its_certificate_and_serves_tls(self):
        from twisted.protocols.tls import TLSMemoryBIOFactory

        service = self.start()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertIsInstance(self.reactor.factories[0], TLSMemoryBIOFactory)
        self.assertEqual(service.certificates["https"]["subject"], "CN=library.test")
        self.assertEqual(service.listeners["https"].describe()[:4], "ssl:")

    def test_a_certificate_that_cannot_be_loaded_stops_it_before_it_serves(self):
        service = self.start(cert_name="missing.pem")
        self.assertRaises(_GaveUp, service.startService)
        [(status, why)] = self.given_up
        self.assertEqual(status, 3)
        self.assertIn("cannot read the certificate", why)
        self.assertIn("not starting", why)
        self.assertEqual(self.reactor.factories, [])  # nothing adopted, nothing served


class _GaveUp(Exception):
    pass


class DrainTests(SynchronousTestCase):
    """
    A draining generation and a new TLS connection whose first request has
    not arrived (its handshake takes round trips): not closed at the idle
    grace, which would reset it, but answered with C{Connection: close} when
    its request comes, or closed at C{--header-timeout} if none does.
    """

    def setUp(self):
        from twisted.internet.task import Clock

        from twisted_graceful.drain import DrainTracker
        from twisted_graceful.hello import HelloResource
        from twisted_graceful.http import GracefulSite

        from tests.test_http import Identity

        self.clock = Clock()
        self.tracker = DrainTracker(self.clock, idle_grace=1.0, progress_interval=0,
                                    clock=self.clock.seconds)
        root = HelloResource(self.clock, Identity(), slow_every=0, emit=lambda m: None)
        self.site = GracefulSite(root, drain_tracker=self.tracker, reactor=self.clock,
                                 header_timeout=10.0)

    def connect(self, tls=True):
        from twisted.internet.interfaces import INegotiated
        from twisted.internet.testing import StringTransport
        from zope.interface import alsoProvides

        class TCPTransport(StringTransport):
            def setTcpNoDelay(self, enabled):
                pass

        proto = self.site.buildProtocol(None)
        transport = TCPTransport()
        if tls:
            alsoProvides(transport, INegotiated)  # (a TCP transport: ISSLTransport extends it)
        proto.makeConnection(transport)
        return proto, transport

    def test_first_request_after_the_grace_is_answered(self):
        from tests.test_http import GET

        proto, transport = self.connect()
        self.tracker.drain()
        self.clock.advance(5)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(GET)
        self.assertIn(b"hello world", transport.value())
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_no_request_closed_at_the_header_timeout(self):
        proto, transport = self.connect()
        self.tracker.drain()
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_after_a_request_the_grace_applies_as_for_plain_http(self):
        from tests.test_http import GET

        proto, transport = self.connect()
        proto.dataReceived(GET)
        self.tracker.drain()
        self.clock.advance(1.0)
        self.assertTrue(transport.disconnecting)

    def test_plain_http_connection_without_a_request_keeps_its_grace(self):
        proto, transport = self.connect(tls=False)
        self.tracker.drain()
        self.clock.advance(1.0)
        self.assertTrue(transport.disconnecting)
