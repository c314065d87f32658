"""
Unit tests of L{twisted_graceful.listeners}: parsing listener descriptions,
binding them, and checking inherited descriptors.
"""

import errno
import fcntl
import gc
import os
import socket
import tempfile

from twisted.internet import reactor as real_reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase

from twisted_graceful._twisted import adopt_listening_port
from twisted_graceful.listeners import (
    ListenerError,
    ListenSpec,
    bind_listener,
    check_listening_socket,
    describe_socket,
    parse_listen_description,
    wrapping_nonblocking,
)


def _ipv6_available():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        s.bind(("::1", 0))
    except OSError:
        return False
    finally:
        s.close()
    return True


class ParseListenDescriptionTests(SynchronousTestCase):
    """
    L{parse_listen_description} turns a port number or an endpoint-style
    string into a L{ListenSpec}.
    """

    def test_bareNumberIsTCPOnAllIPv4Interfaces(self):
        spec = parse_listen_description("8080")
        self.assertEqual(
            (spec.kind, spec.host, spec.port, spec.backlog), ("tcp", "0.0.0.0", 8080, 128)
        )
        self.assertEqual(spec.family, socket.AF_INET)

    def test_bareNumberSurroundingWhitespaceIgnored(self):
        spec = parse_listen_description(" 8080 ")
        self.assertEqual((spec.kind, spec.port), ("tcp", 8080))

    def test_integerAccepted(self):
        spec = parse_listen_description(8080)
        self.assertEqual((spec.kind, spec.port), ("tcp", 8080))

    def test_tcpPort(self):
        spec = parse_listen_description("tcp:8080")
        self.assertEqual((spec.kind, spec.host, spec.port), ("tcp", "0.0.0.0", 8080))

    def test_tcpPortZero(self):
        self.assertEqual(parse_listen_description("tcp:0").port, 0)

    def test_tcpHighestPort(self):
        self.assertEqual(parse_listen_description("tcp:65535").port, 65535)

    def test_tcpPortKeyword(self):
        spec = parse_listen_description("tcp:port=8080")
        self.assertEqual(spec.port, 8080)

    def test_typeIsCaseInsensitive(self):
        self.assertEqual(parse_listen_description("TCP:8080").kind, "tcp")

    def test_tcpInterface(self):
        spec = parse_listen_description("tcp:8080:interface=127.0.0.1")
        self.assertEqual((spec.kind, spec.host, spec.port), ("tcp", "127.0.0.1", 8080))

    def test_tcp6DefaultsToAllIPv6Interfaces(self):
        spec = parse_listen_description("tcp6:8080")
        self.assertEqual((spec.kind, spec.host, spec.port), ("tcp6", "::", 8080))
        self.assertEqual(spec.family, socket.AF_INET6)

    def test_tcp6EscapedColonsInInterface(self):
        spec = parse_listen_description("tcp6:8080:interface=\\:\\:1")
        self.assertEqual((spec.kind, spec.host, spec.port), ("tcp6", "::1", 8080))

    def test_tcp6ScopedInterfaceLeftToBind(self):
        spec = parse_listen_description("tcp6:8080:interface=fe80\\:\\:1%lo")
        self.assertEqual(spec.host, "fe80::1%lo")

    def test_backlog(self):
        spec = parse_listen_description("tcp:8080:backlog=7")
        self.assertEqual(spec.backlog, 7)

    def test_descriptionKeptForMessages(self):
        self.assertEqual(parse_listen_description("8080").description, "tcp:8080")
        self.assertEqual(
            parse_listen_description("tcp:8080:backlog=5").description, "tcp:8080:backlog=5"
        )

    def test_unixRelativePathMadeAbsolute(self):
        spec = parse_listen_description("unix:relative/app.sock")
        self.assertEqual(spec.kind, "unix")
        self.assertEqual(spec.path, os.path.join(os.getcwd(), "relative", "app.sock"))
        self.assertTrue(os.path.isabs(spec.path))
        self.assertEqual(spec.family, socket.AF_UNIX)

    def test_unixAbsolutePath(self):
        spec = parse_listen_description("unix:/run/app.sock")
        self.assertEqual((spec.path, spec.mode), ("/run/app.sock", 0o666))

    def test_unixAddressKeyword(self):
        self.assertEqual(parse_listen_description("unix:address=/run/a.sock").path, "/run/a.sock")

    def test_unixMode(self):
        spec = parse_listen_description("unix:/run/app.sock:mode=660")
        self.assertEqual(spec.mode, 0o660)

    def test_unixBacklog(self):
        self.assertEqual(parse_listen_description("unix:/run/app.sock:backlog=3").backlog, 3)

    def test_unixLockfileIgnored(self):
        spec = parse_listen_description("unix:/run/app.sock:lockfile=1")
        self.assertEqual(spec.path, "/run/app.sock")

    def test_unixEscapedColonInPath(self):
        self.assertEqual(parse_listen_description("unix:/run/a\\:b.sock").path, "/run/a:b.sock")

    def test_systemdName(self):
        spec = parse_listen_description("systemd:http")
        self.assertEqual((spec.kind, spec.name, spec.index), ("systemd", "http", -1))
        self.assertIsNone(spec.family)

    def test_systemdDomainAndNameKeywords(self):
        spec = parse_listen_description("systemd:domain=INET:name=x")
        self.assertEqual((spec.kind, spec.name, spec.index), ("systemd", "x", -1))

    def test_systemdIndex(self):
        spec = parse_listen_description("systemd:domain=INET:index=2")
        self.assertEqual((spec.name, spec.index), ("", 2))

    def test_systemdIndexZero(self):
        self.assertEqual(parse_listen_description("systemd:index=0").index, 0)


class ParseListenDescriptionErrorTests(SynchronousTestCase):
    """
    Every description L{parse_listen_description} cannot use raises
    L{ListenerError} naming the option and saying what is wrong.
    """

    def assertRejected(self, description, *fragments, option="--port"):
        error = self.assertRaises(ListenerError, parse_listen_description, description, option)
        message = str(error)
        self.assertIn(option, message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_empty(self):
        self.assertRejected("", "empty")

    def test_whitespaceOnly(self):
        self.assertRejected("   ", "empty")

    def test_optionNameUsed(self):
        self.assertRejected("bogus:1", "unsupported listener type", option="--txn-port")

    def test_unknownType(self):
        self.assertRejected("ssl:443", "unsupported listener type", "'ssl'")

    def test_badPort(self):
        self.assertRejected("tcp:http", "port must be a number from 0 to 65535", "'http'")

    def test_missingPort(self):
        self.assertRejected("tcp:", "port must be a number")

    def test_portOutOfRange(self):
        self.assertRejected("tcp:65536", "port must be a number from 0 to 65535", "65536")

    def test_negativePort(self):
        self.assertRejected("tcp:-1", "port must be a number")

    def test_bareNumberOutOfRange(self):
        self.assertRejected("70000", "port must be a number from 0 to 65535")

    def test_tcpNonIPv4Interface(self):
        self.assertRejected("tcp:8080:interface=\\:\\:1", "'::1' is not an IPv4 address")

    def test_unescapedColonsInInterfaceRejected(self):
        """
        Unescaped, C{interface=::1} splits into an empty interface and stray
        parts: it must not fall back to listening on every interface.
        """
        self.assertRejected("tcp6:8080:interface=::1", "unexpected parameter")

    def test_tcpHostnameInterface(self):
        self.assertRejected("tcp:8080:interface=localhost", "is not an IPv4 address")

    def test_tcp6IPv4Interface(self):
        self.assertRejected("tcp6:8080:interface=127.0.0.1", "'127.0.0.1' is not an IPv6 address")

    def test_tcp6MalformedInterfaceWithColon(self):
        self.assertRejected("tcp6:8080:interface=\\:zz", "':zz' is not an IPv6 address")

    def test_tcpUnknownKeyword(self):
        self.assertRejected("tcp:8080:colour=blue", "unknown parameter", "colour")

    def test_tcpUnixOnlyKeywordRejected(self):
        self.assertRejected("tcp:8080:mode=600", "unknown parameter", "mode")

    def test_unixUnknownKeyword(self):
        self.assertRejected("unix:/run/a.sock:colour=blue", "unknown parameter", "colour")

    def test_systemdUnknownKeyword(self):
        self.assertRejected("systemd:http:colour=blue", "unknown parameter", "colour")

    def test_extraPositionalRejected(self):
        """
        Twisted reads C{tcp:8080:127.0.0.1} as an interface; it must not
        silently listen on every interface instead.
        """
        self.assertRejected("tcp:8080:127.0.0.1", "unexpected parameter", "127.0.0.1")

    def test_badBacklog(self):
        self.assertRejected("tcp:8080:backlog=many", "backlog must be a positive integer")

    def test_zeroBacklog(self):
        self.assertRejected("tcp:8080:backlog=0", "backlog must be a positive integer")

    def test_unixWithoutPath(self):
        self.assertRejected("unix:", "unix: needs a socket path")

    def test_unixBadMode(self):
        self.assertRejected("unix:/run/a.sock:mode=rw", "mode must be octal", "'rw'")

    def test_systemdWithoutNameOrIndex(self):
        self.assertRejected("systemd:", "needs a socket name or index")

    def test_systemdBadIndex(self):
        self.assertRejected("systemd:index=-1", "index must be a number >= 0")

    def test_systemdNonNumericIndex(self):
        self.assertRejected("systemd:index=first", "index must be a number >= 0")

    def test_descriptionQuoted(self):
        message = self.assertRejected("tcp:99999")
        self.assertIn("'tcp:99999'", message)


class BindListenerTests(SynchronousTestCase):
    """
    L{bind_listener} binds a fresh listening, non-blocking socket.
    """

    def tempdir(self):
        path = tempfile.mkdtemp()
        self.addCleanup(_rmtree, path)
        return path

    def bind(self, description, option="--port"):
        sock = bind_listener(parse_listen_description(description, option), option)
        self.addCleanup(sock.close)
        return sock

    def test_tcpLoopbackEphemeralPort(self):
        sock = self.bind("tcp:0:interface=127.0.0.1")
        host, port = sock.getsockname()
        self.assertEqual(host, "127.0.0.1")
        self.assertNotEqual(port, 0)
        self.assertEqual(sock.family, socket.AF_INET)
        self.assertEqual(sock.type, socket.SOCK_STREAM)

    def test_tcpSocketIsListening(self):
        sock = self.bind("tcp:0:interface=127.0.0.1")
        self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

    def test_tcpSocketIsNonBlocking(self):
        sock = self.bind("tcp:0:interface=127.0.0.1")
        self.assertFalse(sock.getblocking())
        self.assertTrue(fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)

    def test_tcpAcceptsConnections(self):
        sock = self.bind("tcp:0:interface=127.0.0.1")
        client = socket.create_connection(sock.getsockname(), timeout=5)
        self.addCleanup(client.close)
        sock.setblocking(True)
        conn, _ = sock.accept()
        conn.close()

    def test_tcpPortInUse(self):
        first = self.bind("tcp:0:interface=127.0.0.1")
        port = first.getsockname()[1]
        description = f"tcp:{port}:interface=127.0.0.1"
        error = self.assertRaises(
            ListenerError,
            bind_listener,
            parse_listen_description(description, "--txn-port"),
            "--txn-port",
        )
        message = str(error)
        self.assertIn("--txn-port", message)
        self.assertIn("address already in use", message)
        self.assertIn(f"127.0.0.1 port {port}", message)

    def test_tcpUnassignedAddress(self):
        # 192.0.2.0/24 is TEST-NET-1: not an address of this host.
        error = self.assertRaises(
            ListenerError, bind_listener, parse_listen_description("tcp:0:interface=192.0.2.1")
        )
        self.assertIn("cannot listen on 192.0.2.1", str(error))

    def test_tcp6Loopback(self):
        if not _ipv6_available():
            raise self.skipTest("no IPv6 loopback")
        sock = self.bind("tcp6:0:interface=\\:\\:1")
        self.assertEqual(sock.family, socket.AF_INET6)
        self.assertEqual(sock.getsockname()[0], "::1")
        self.assertTrue(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))

    def test_unixSocketInTempDir(self):
        path = os.path.join(self.tempdir(), "app.sock")
        sock = self.bind("unix:" + path)
        self.assertEqual(sock.family, socket.AF_UNIX)
        self.assertEqual(sock.getsockname(), path)
        self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        self.assertFalse(sock.getblocking())

    def test_unixSocketMode(self):
        path = os.path.join(self.tempdir(), "app.sock")
        self.bind(f"unix:{path}:mode=600")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

    def test_unixStaleSocketReplaced(self):
        path = os.path.join(self.tempdir(), "app.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()  # the file stays; nobody listens
        self.assertTrue(os.path.exists(path))
        sock = self.bind("unix:" + path)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(path)
        self.assertEqual(sock.getsockname(), path)

    def test_unixLiveSocketRefused(self):
        path = os.path.join(self.tempdir(), "app.sock")
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(live.close)
        live.bind(path)
        live.listen(5)
        error = self.assertRaises(
            ListenerError, bind_listener, parse_listen_description("unix:" + path)
        )
        self.assertIn("--port", str(error))
        self.assertIn("already in use", str(error))
        # The live server still gets its connections.
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(path)

    def test_unixRegularFileRefusedAndLeftIntact(self):
        path = os.path.join(self.tempdir(), "app.sock")
        with open(path, "w") as f:
            f.write("precious")
        error = self.assertRaises(
            ListenerError, bind_listener, parse_listen_description("unix:" + path)
        )
        self.assertIn("is not a socket", str(error))
        self.assertIn("refusing to replace it", str(error))
        with open(path) as f:
            self.assertEqual(f.read(), "precious")

    def test_unixMissingDirectory(self):
        path = os.path.join(self.tempdir(), "missing", "app.sock")
        error = self.assertRaises(
            ListenerError, bind_listener, parse_listen_description("unix:" + path)
        )
        self.assertIn(f"cannot listen on {path}", str(error))


class CheckListeningSocketTests(SynchronousTestCase):
    """
    L{check_listening_socket} accepts only a listening stream socket.
    """

    def listening(self, family=socket.AF_INET):
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0) if family == socket.AF_INET else ("::1", 0))
        sock.listen(5)
        return sock

    def assertRejected(self, fd, fragment, family=None):
        error = self.assertRaises(ListenerError, check_listening_socket, fd, family)
        self.assertIn(f"fd {fd}", str(error))
        self.assertIn(fragment, str(error))

    def test_acceptsListeningSocket(self):
        original = self.listening()
        checked = check_listening_socket(original.fileno())
        self.addCleanup(checked.close)
        self.assertEqual(checked.getsockname(), original.getsockname())

    def test_returnsADup(self):
        original = self.listening()
        checked = check_listening_socket(original.fileno())
        self.addCleanup(checked.close)
        self.assertNotEqual(checked.fileno(), original.fileno())

    def test_originalDescriptorStaysOpen(self):
        original = self.listening()
        check_listening_socket(original.fileno()).close()
        os.fstat(original.fileno())  # does not raise
        self.assertTrue(original.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

    def test_acceptsMatchingFamily(self):
        original = self.listening()
        check_listening_socket(original.fileno(), socket.AF_INET).close()

    def test_rejectsClosedDescriptor(self):
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        self.assertRejected(r, "is not open")

    def test_rejectsRegularFile(self):
        f = tempfile.TemporaryFile()
        self.addCleanup(f.close)
        self.assertRejected(f.fileno(), "is not a socket")

    def test_rejectsPipe(self):
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.assertRejected(r, "is not a socket")

    def test_rejectsNonListeningSocket(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        self.assertRejected(sock.fileno(), "not listening")

    def test_rejectsUDPSocket(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        self.assertRejected(sock.fileno(), "not a stream socket")

    def test_rejectsWrongFamily(self):
        original = self.listening()
        self.assertRejected(original.fileno(), "is a IPv4 socket, expected IPv6", socket.AF_INET6)

    def test_rejectsUnixSocketWhereTCPExpected(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        # A connected socket pair is not listening either; the listening check
        # comes first.
        self.assertRejected(a.fileno(), "not listening", socket.AF_INET)

    def test_rejectionLeavesNoExtraDescriptor(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        gc.collect()  # an earlier test's garbage must not close its sockets during this one
        before = _open_fds()
        self.assertRaises(ListenerError, check_listening_socket, sock.fileno())
        self.assertEqual(_open_fds(), before)


def _non_blocking(fd):
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


class NonBlockingTakeOverTests(SynchronousTestCase):
    """
    A listening socket taken over by a generation is non-blocking, in every
    process holding it: C{O_NONBLOCK} is on the open file description they
    share (docs/design.md, facts 2 and 44). PyPy's C{socket(fileno=...)}
    cleared it, so a new generation's C{accept()} waited in the kernel for
    the next connection and never read those it had accepted.
    """

    def listening(self, blocking):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen(5)
        sock.setblocking(blocking)
        return sock

    def test_checkingKeepsANonBlockingSocketNonBlocking(self):
        original = self.listening(blocking=False)
        checked = check_listening_socket(original.fileno())
        self.addCleanup(checked.close)
        self.assertTrue(_non_blocking(original.fileno()), "the previous holder's copy blocks")
        self.assertTrue(_non_blocking(checked.fileno()))
        self.assertEqual(checked.gettimeout(), 0.0)

    def test_checkingMakesABlockingSocketNonBlocking(self):
        # systemd passes blocking sockets (NonBlocking=no); adoptStreamPort needs
        # non-blocking ones, so taking one over sets the flag, for every holder.
        original = self.listening(blocking=True)
        checked = check_listening_socket(original.fileno())
        self.addCleanup(checked.close)
        self.assertTrue(_non_blocking(checked.fileno()))
        self.assertTrue(_non_blocking(original.fileno()))

    def test_checkingADatagramSocketMakesItNonBlocking(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        checked = check_listening_socket(sock.fileno(), socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(checked.close)
        self.assertTrue(_non_blocking(sock.fileno()))

    def adopt(self, sock):
        port = adopt_listening_port(real_reactor, sock, Factory())
        self.addCleanup(port.connectionLost, None)
        return port

    def test_adoptedPortAcceptsWithoutBlocking(self):
        """
        The adopted port's socket and the other holders' copies are
        non-blocking after adoption and after garbage collection (on PyPy a
        wrapper is closed or finalized when the collector runs), and the
        port's accept loop ends when the queue is empty instead of waiting.
        """
        other = self.listening(blocking=False)  # the previous generation's copy
        port = self.adopt(check_listening_socket(other.fileno()))
        gc.collect()
        self.assertTrue(_non_blocking(port.fileno()))
        self.assertTrue(_non_blocking(other.fileno()))
        client = socket.create_connection(other.getsockname(), timeout=5)
        self.addCleanup(client.close)
        accepted = []
        port.factory = _Recording(accepted)
        # One connection queued: accept it, then EAGAIN ends the loop (on a
        # blocking socket the second accept() would wait here).
        port.doRead()
        self.assertEqual(len(accepted), 1)
        for transport in accepted:
            transport.stopReading()
            transport.socket.close()

    def test_adoptingABlockingSocketMakesItNonBlocking(self):
        sock = self.listening(blocking=True)
        other = socket.socket(fileno=os.dup(sock.fileno()))
        self.addCleanup(other.close)
        port = self.adopt(sock)
        self.assertTrue(_non_blocking(port.fileno()))

    def test_factoryStartsWithTheUsualDefaultTimeout(self):
        """
        Only the wrapping of the descriptor runs with a default timeout of 0:
        the factory, started by C{startListening}, may make blocking sockets
        of its own.
        """
        seen = []

        class Starting(Factory):
            def startFactory(self):
                seen.append(socket.getdefaulttimeout())

        self.addCleanup(socket.setdefaulttimeout, socket.getdefaulttimeout())
        socket.setdefaulttimeout(None)
        port = adopt_listening_port(real_reactor, self.listening(blocking=False), Starting())
        self.addCleanup(port.connectionLost, None)
        self.assertEqual(seen, [None])

    def test_defaultTimeoutPutBack(self):
        previous = socket.getdefaulttimeout()
        self.addCleanup(socket.setdefaulttimeout, previous)
        socket.setdefaulttimeout(7.5)
        with wrapping_nonblocking():
            self.assertEqual(socket.getdefaulttimeout(), 0.0)
        self.assertEqual(socket.getdefaulttimeout(), 7.5)
        with self.assertRaises(ZeroDivisionError):
            with wrapping_nonblocking():
                raise ZeroDivisionError()
        self.assertEqual(socket.getdefaulttimeout(), 7.5)


class _Recording(Factory):
    """
    Keeps the transport of every connection accepted.
    """

    def __init__(self, accepted):
        self.accepted = accepted

    def buildProtocol(self, addr):
        protocol = Protocol()
        protocol.connectionMade = lambda: self.accepted.append(protocol.transport)
        return protocol


class DescribeSocketTests(SynchronousTestCase):
    def test_tcp(self):
        sock = bind_listener(parse_listen_description("tcp:0:interface=127.0.0.1"))
        self.addCleanup(sock.close)
        self.assertEqual(describe_socket(sock), f"tcp:127.0.0.1:{sock.getsockname()[1]}")

    def test_unix(self):
        path = os.path.join(tempfile.mkdtemp(), "a.sock")
        self.addCleanup(_rmtree, os.path.dirname(path))
        sock = bind_listener(parse_listen_description("unix:" + path))
        self.addCleanup(sock.close)
        self.assertEqual(describe_socket(sock), "unix:" + path)


class ListenSpecTests(SynchronousTestCase):
    def test_systemdHasNoFamily(self):
        self.assertIsNone(ListenSpec("systemd:x", "systemd", name="x").family)


def _open_fds():
    return set(int(fd) for fd in os.listdir("/proc/self/fd") if _is_open(int(fd)))


def _is_open(fd):
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno != errno.EBADF
    return True


def _rmtree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)
