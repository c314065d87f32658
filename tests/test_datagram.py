"""
The UDP listener's pieces: C{--udp-port} parsing, binding and checking a
datagram socket, handing it over (C{inherit_listeners}), adopting it without
reading, and the PING protocol.
"""

import os
import re
import socket

from twisted.internet import reactor as real_reactor
from twisted.trial.unittest import SynchronousTestCase

from twisted_graceful import handoff
from twisted_graceful._twisted import adopt_listening_port
from twisted_graceful.datagram import PingProtocol, self_test_ping
from twisted_graceful.listeners import (
    DATAGRAM,
    STREAM,
    TLS,
    ListenerError,
    bind_listener,
    check_listening_socket,
    describe_socket,
    parse_listen_description,
)


class ParseTests(SynchronousTestCase):
    def test_udp_with_interface(self):
        spec = parse_listen_description("udp:5140:interface=127.0.0.1", "--udp-port", DATAGRAM)
        self.assertEqual((spec.kind, spec.host, spec.port), ("udp", "127.0.0.1", 5140))
        self.assertEqual(spec.expects, (socket.AF_INET, socket.SOCK_DGRAM))

    def test_a_number_is_udp_on_every_interface(self):
        spec = parse_listen_description("514", "--udp-port", DATAGRAM)
        self.assertEqual((spec.kind, spec.host, spec.port), ("udp", "0.0.0.0", 514))

    def test_ipv6_interface(self):
        spec = parse_listen_description(r"udp:5140:interface=\:\:1", "--udp-port", DATAGRAM)
        self.assertEqual(spec.expects, (socket.AF_INET6, socket.SOCK_DGRAM))

    def test_systemd_datagram(self):
        spec = parse_listen_description("systemd:syslog", "--udp-port", DATAGRAM)
        self.assertEqual((spec.kind, spec.name), ("systemd", "syslog"))
        self.assertEqual(spec.expects, (None, socket.SOCK_DGRAM))

    def assertRefused(self, description, role, *fragments):
        option = {STREAM: "--port", DATAGRAM: "--udp-port", TLS: "--tls-port"}[role]
        error = self.assertRaises(ListenerError, parse_listen_description, description,
                                  option, role)
        for fragment in fragments:
            self.assertIn(fragment, str(error))

    def test_stream_kinds_are_not_datagrams(self):
        self.assertRefused("tcp:514", DATAGRAM, "--udp-port 'tcp:514'", "--port takes tcp:",
                           "udp:PORT")
        self.assertRefused("unix:/run/x", DATAGRAM, "unsupported listener type 'unix'")

    def test_udp_is_not_a_stream(self):
        self.assertRefused("udp:514", STREAM, "--port 'udp:514'", "--udp-port takes udp:")

    def test_bad_port_and_interface(self):
        self.assertRefused("udp:70000", DATAGRAM, "port must be a number from 0 to 65535")
        self.assertRefused("udp:1:interface=example.com", DATAGRAM,
                           "'example.com' is not an IPv4 or IPv6 address")
        self.assertRefused("udp:1:mode=600", DATAGRAM, "unknown parameter(s) mode")


class SocketTests(SynchronousTestCase):
    def bound(self):
        spec = parse_listen_description("udp:0:interface=127.0.0.1", "--udp-port", DATAGRAM)
        sock = bind_listener(spec, "--udp-port")
        self.addCleanup(sock.close)
        return sock

    def test_bound_non_blocking_datagram_socket(self):
        sock = self.bound()
        self.assertEqual(sock.type, socket.SOCK_DGRAM)
        self.assertFalse(sock.getblocking())
        self.assertRegex(describe_socket(sock), r"^udp:127\.0\.0\.1:\d+$")

    def test_receive_buffer(self):
        spec = parse_listen_description("udp:0:interface=127.0.0.1:rcvbuf=65536", "--udp-port",
                                        DATAGRAM)
        sock = bind_listener(spec, "--udp-port")
        self.addCleanup(sock.close)
        # Linux doubles it (bookkeeping); at least what was asked for.
        self.assertGreaterEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), 65536)
        error = self.assertRaises(ListenerError, parse_listen_description, "udp:0:rcvbuf=-1",
                                  "--udp-port", DATAGRAM)
        self.assertIn("rcvbuf must be a number of bytes, not '-1'", str(error))
        error = self.assertRaises(ListenerError, parse_listen_description, "tcp:0:rcvbuf=1",
                                  "--port")
        self.assertIn("unknown parameter(s) rcvbuf", str(error))

    def test_check_accepts_a_bound_datagram_socket(self):
        sock = self.bound()
        checked = check_listening_socket(sock.fileno(), socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(checked.close)
        self.assertEqual(checked.getsockname(), sock.getsockname())

    def test_check_refuses_a_stream_socket_where_a_datagram_is_expected(self):
        stream = socket.socket()
        self.addCleanup(stream.close)
        stream.bind(("127.0.0.1", 0))
        stream.listen()
        error = self.assertRaises(ListenerError, check_listening_socket, stream.fileno(), None,
                                  socket.SOCK_DGRAM)
        self.assertIn("is a stream socket, not a datagram (UDP) socket", str(error))

    def test_check_refuses_an_unbound_datagram_socket(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        error = self.assertRaises(ListenerError, check_listening_socket, sock.fileno(), None,
                                  socket.SOCK_DGRAM)
        self.assertIn("not bound to a port", str(error))

    def test_check_refuses_a_unix_datagram_socket(self):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        error = self.assertRaises(ListenerError, check_listening_socket, a.fileno(), None,
                                  socket.SOCK_DGRAM)
        self.assertIn("expected UDP", str(error))

    def test_handed_over_by_name(self):
        sock = self.bound()
        fd = os.dup(sock.fileno())
        environ = {handoff.LISTENERS_ENV: f"udp={fd}"}
        sockets = handoff.inherit_listeners(environ, {"udp": (socket.AF_INET,
                                                              socket.SOCK_DGRAM)})
        self.addCleanup(sockets["udp"].close)
        self.assertEqual(sockets["udp"].getsockname(), sock.getsockname())
        self.assertRaises(OSError, os.fstat, fd)  # the inherited fd is closed, the dup kept

    def test_handoff_refuses_a_datagram_socket_for_a_stream_listener(self):
        sock = self.bound()
        fd = os.dup(sock.fileno())
        self.addCleanup(os.close, fd)
        error = self.assertRaises(handoff.HandoffError, handoff.inherit_listeners,
                                  {handoff.LISTENERS_ENV: f"http={fd}"}, {"http": None})
        self.assertIn("listener 'http'", str(error))
        self.assertIn("not a stream socket", str(error))

    def test_adopted_without_reading_and_closed_without_shutdown(self):
        """
        Adopted with C{adoptDatagramPort}, not read until resumed; closing
        the port leaves the socket working for another holder (here: us).
        """
        sock = self.bound()
        keep = socket.socket(fileno=os.dup(sock.fileno()))  # the next generation's copy
        self.addCleanup(keep.close)
        keep.settimeout(5)
        port = adopt_listening_port(real_reactor, sock, PingProtocol(_Identity()))
        self.assertEqual(sock.fileno(), -1)  # our copy closed: the port holds its own
        self.assertNotIn(port, real_reactor.getReaders())
        port.startReading()
        self.assertIn(port, real_reactor.getReaders())
        port.stopReading()
        port.connectionLost()  # what stopListening ends with
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"still here", keep.getsockname())
            self.assertEqual(keep.recvfrom(64)[0], b"still here")


class _Identity:
    pid = 4242
    generation = 3


class _Transport:
    def __init__(self, fail=False):
        self.written = []
        self.fail = fail

    def write(self, data, addr):
        if self.fail:
            raise OSError(11, "Resource temporarily unavailable")
        self.written.append((data, addr))


class PingProtocolTests(SynchronousTestCase):
    def protocol(self, fail=False):
        results = []
        proto = PingProtocol(_Identity(), observer=results.append)
        proto.transport = _Transport(fail)
        return proto, results

    def test_ping_is_answered_to_its_sender(self):
        proto, results = self.protocol()
        proto.datagramReceived(b"PING abc-1\n", ("127.0.0.1", 9999))
        self.assertEqual(proto.transport.written,
                         [(b"PONG abc-1 pid 4242 generation 3\n", ("127.0.0.1", 9999))])
        self.assertEqual(results, ["pong"])

    def test_anything_else_is_a_log_message(self):
        proto, results = self.protocol()
        proto.datagramReceived(b"<13>Dec  4 03:00:00 host app: hello", ("127.0.0.1", 1))
        proto.datagramReceived(b"", ("127.0.0.1", 1))
        proto.datagramReceived(b"PINGxyz", ("127.0.0.1", 1))
        self.assertEqual(proto.transport.written, [])
        self.assertEqual(results, ["log", "log", "log"])
        self.assertEqual(proto.counts["log"], 3)

    def test_malformed_ping_is_refused_not_answered(self):
        proto, results = self.protocol()
        for data in (b"PING ", b"PING a b", b"PING " + b"x" * 257):
            proto.datagramReceived(data, ("127.0.0.1", 1))
        self.assertEqual(proto.transport.written, [])
        self.assertEqual(results, ["refused"] * 3)

    def test_answer_that_cannot_be_sent(self):
        proto, results = self.protocol(fail=True)
        proto.datagramReceived(b"PING a", ("127.0.0.1", 1))
        self.assertEqual(results, ["refused"])
        self.flushLoggedErrors()

    def test_self_test(self):
        proto, results = self.protocol()
        reply = self.successResultOf(self_test_ping(proto))
        self.assertEqual(reply, b"PONG self-test pid 4242 generation 3\n")
        self.assertEqual(results, [])  # not counted, nothing sent
        self.assertEqual(proto.transport.written, [])


class UnitFileTests(SynchronousTestCase):
    """
    The shipped systemd units: the socket-activated service takes a datagram
    socket and an HTTPS stream socket by the names their C{.socket} units
    give them; the bound unit's C{--udp-port} and C{--tls-port} parse.
    """

    def read(self, name):
        from tests.test_tap import UNITS

        with open(os.path.join(UNITS, name)) as f:
            return f.read().replace("\\\n", " ")

    def option(self, unit, option, role):
        m = re.search(rf"{option}\s+(\S+)", self.read(unit))
        self.assertIsNotNone(m, unit)
        return parse_listen_description(m.group(1), option, role)

    def assertSocketUnit(self, name, spec, directive, other):
        socket_unit = self.read(name)
        self.assertRegex(socket_unit, rf"(?m)^{directive}=")
        self.assertNotRegex(socket_unit, rf"(?m)^{other}=")
        self.assertEqual(re.findall(r"(?m)^FileDescriptorName=(\S+)", socket_unit), [spec.name])
        sockets = " ".join(re.findall(r"(?m)^Sockets=(.*)$", self.read("graceful.service")))
        self.assertIn(name, sockets)

    def test_socket_activated_udp(self):
        spec = self.option("graceful.service", "--udp-port", DATAGRAM)
        self.assertEqual(spec.kind, "systemd")
        self.assertSocketUnit("graceful-udp.socket", spec, "ListenDatagram", "ListenStream")

    def test_socket_activated_https(self):
        spec = self.option("graceful.service", "--tls-port", TLS)
        self.assertEqual(set(dict(spec.tls)), {"privateKey", "certKey"})
        self.assertSocketUnit("graceful-https.socket", spec, "ListenStream", "ListenDatagram")

    def test_bound(self):
        self.assertEqual(self.option("graceful-bound.service", "--udp-port", DATAGRAM).kind,
                         "udp")
        spec = self.option("graceful-bound.service", "--tls-port", TLS)
        self.assertEqual((spec.kind, spec.port), ("ssl", 8443))
