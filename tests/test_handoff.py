"""
Unit tests of L{twisted_graceful.handoff}: the environment one generation
hands to the next, and its validation.
"""

import os
import resource
import socket
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from twisted_graceful import handoff
from twisted_graceful.handoff import (
    GENERATION_ENV,
    HANDOFF_VARIABLES,
    LISTENERS_ENV,
    READY_FD_ENV,
    READY_TIMEOUT_ENV,
    STDIO_FDS_ENV,
    HandoffError,
    forget_handoff,
    format_listener_map,
    inherit_generation,
    inherit_listeners,
    inherit_ready_fd,
    inherit_ready_timeout,
    inherit_stdio_fds,
    is_handoff,
    parse_listener_map,
)
from twisted_graceful.listeners import ListenerError


def _is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class ParseListenerMapTests(SynchronousTestCase):
    """
    L{parse_listener_map} reads C{name=fd,name=fd}.
    """

    def assertRejected(self, text, *fragments):
        error = self.assertRaises(HandoffError, parse_listener_map, text)
        self.assertIn(LISTENERS_ENV, str(error))
        for fragment in fragments:
            self.assertIn(fragment, str(error))

    def test_single(self):
        self.assertEqual(parse_listener_map("http=3"), {"http": 3})

    def test_severalInOrder(self):
        result = parse_listener_map("txn=5,http=3")
        self.assertEqual(list(result.items()), [("txn", 5), ("http", 3)])

    def test_whitespaceAroundItems(self):
        self.assertEqual(parse_listener_map(" http=3 , txn=5 "), {"http": 3, "txn": 5})

    def test_namesWithDotsDashesUnderscores(self):
        self.assertEqual(parse_listener_map("a.b-c_d1=7"), {"a.b-c_d1": 7})

    def test_roundTripsWithFormat(self):
        mapping = {"http": 3, "txn": 5}
        self.assertEqual(parse_listener_map(format_listener_map(mapping)), mapping)

    def test_formatListenerMap(self):
        self.assertEqual(format_listener_map({"http": 3, "txn": 5}), "http=3,txn=5")

    def test_isHandoffError(self):
        self.assertTrue(issubclass(HandoffError, ListenerError))

    def test_empty(self):
        self.assertRejected("", "is empty")

    def test_whitespaceOnly(self):
        self.assertRejected("  ", "is empty")

    def test_noEqualsSign(self):
        self.assertRejected("http", "'http' is not of the form name=fd")

    def test_emptyName(self):
        self.assertRejected("=3", "not of the form name=fd")

    def test_nameStartingWithDigit(self):
        self.assertRejected("1http=3", "not of the form name=fd")

    def test_nameWithBadCharacters(self):
        self.assertRejected("ht tp=3", "not of the form name=fd")

    def test_trailingComma(self):
        self.assertRejected("http=3,", "not of the form name=fd")

    def test_fdNotANumber(self):
        self.assertRejected("http=three", "'three' is not a file descriptor number")

    def test_emptyFd(self):
        self.assertRejected("http=", "is not a file descriptor number")

    def test_negativeFd(self):
        self.assertRejected("http=-1", "'-1' is not a file descriptor number")

    def test_duplicateName(self):
        self.assertRejected("http=3,http=5", "listener 'http' is named twice")

    def test_duplicateFd(self):
        self.assertRejected("http=3,txn=3", "fd 3 is given to two listeners")

    def test_stdinRejected(self):
        self.assertRejected("http=0", "fd 0 is stdin/stdout/stderr")

    def test_stdoutRejected(self):
        self.assertRejected("http=1", "fd 1 is stdin/stdout/stderr")

    def test_stderrRejected(self):
        self.assertRejected("http=2", "fd 2 is stdin/stdout/stderr")

    def test_hugeFdIsBoundedByTheFdLimit(self):
        # int() takes it, but no process can have such an fd (it overflowed
        # in socket.socket(fileno=...), a traceback).
        self.assertRejected("http=99999999999999999999", "RLIMIT_NOFILE")

    def test_fdBeyondTheFdLimit(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = soft if soft != resource.RLIM_INFINITY else hard
        self.assertRejected(f"http={limit}", f"fd {limit}", "RLIMIT_NOFILE")

    def test_veryLongValueIsNotEchoedWhole(self):
        error = self.assertRaises(HandoffError, parse_listener_map, "http=" + "9" * 100000)
        self.assertLess(len(str(error)), 400)

    def test_garbageQuotedInMessage(self):
        self.assertRejected("http=3;txn=5", "GRACEFUL_LISTENERS='http=3;txn=5'")


class IsHandoffTests(SynchronousTestCase):
    def test_plainEnvironment(self):
        self.assertFalse(is_handoff({"PATH": "/bin"}))

    def test_listenersVariable(self):
        self.assertTrue(is_handoff({LISTENERS_ENV: "http=3"}))

    def test_readyFdVariable(self):
        self.assertTrue(is_handoff({READY_FD_ENV: "4"}))


class InheritListenersTests(SynchronousTestCase):
    """
    L{inherit_listeners} takes over real listening sockets by name.
    """

    def listening(self, family=socket.AF_INET, listen=True):
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        if family == socket.AF_UNIX:
            path = os.path.join(tempfile.mkdtemp(), "s")
            self.addCleanup(os.rmdir, os.path.dirname(path))
            self.addCleanup(os.unlink, path)
            sock.bind(path)
        else:
            sock.bind(("127.0.0.1", 0))
        if listen:
            sock.listen(5)
        return sock

    def inherited(self, sock):
        """
        An fd as the previous generation would pass it: a dup we own.
        """
        fd = os.dup(sock.fileno())
        self.addCleanup(_close_quietly, fd)
        return fd

    def adopt(self, environ, wanted):
        sockets = inherit_listeners(environ, wanted)
        for sock in sockets.values():
            self.addCleanup(sock.close)
        return sockets

    def test_returnsSocketsByName(self):
        http, txn = self.listening(), self.listening()
        env = {LISTENERS_ENV: f"http={self.inherited(http)},txn={self.inherited(txn)}"}
        sockets = self.adopt(env, {"http": socket.AF_INET, "txn": socket.AF_INET})
        self.assertEqual(set(sockets), {"http", "txn"})
        self.assertEqual(sockets["http"].getsockname(), http.getsockname())
        self.assertEqual(sockets["txn"].getsockname(), txn.getsockname())

    def test_familyNoneAcceptsAny(self):
        http = self.listening()
        sockets = self.adopt({LISTENERS_ENV: f"http={self.inherited(http)}"}, {"http": None})
        self.assertEqual(sockets["http"].getsockname(), http.getsockname())

    def test_unixListener(self):
        sock = self.listening(socket.AF_UNIX)
        sockets = self.adopt(
            {LISTENERS_ENV: f"local={self.inherited(sock)}"}, {"local": socket.AF_UNIX}
        )
        self.assertEqual(sockets["local"].family, socket.AF_UNIX)

    def test_closesInheritedFds(self):
        http = self.listening()
        fd = self.inherited(http)
        sockets = self.adopt({LISTENERS_ENV: f"http={fd}"}, {"http": socket.AF_INET})
        self.assertFalse(_is_open(fd))
        self.assertNotEqual(sockets["http"].fileno(), fd)

    def test_returnedSocketsStillListen(self):
        http = self.listening()
        sockets = self.adopt(
            {LISTENERS_ENV: f"http={self.inherited(http)}"}, {"http": socket.AF_INET}
        )
        http.close()  # the previous generation goes away
        client = socket.create_connection(sockets["http"].getsockname(), timeout=5)
        self.addCleanup(client.close)
        sockets["http"].accept()[0].close()

    def test_missingVariable(self):
        error = self.assertRaises(HandoffError, inherit_listeners, {}, {"http": socket.AF_INET})
        self.assertIn(LISTENERS_ENV, str(error))

    def test_missingName(self):
        http = self.listening()
        env = {LISTENERS_ENV: f"http={self.inherited(http)}"}
        error = self.assertRaises(
            HandoffError, inherit_listeners, env, {"http": socket.AF_INET, "txn": socket.AF_INET}
        )
        self.assertIn(LISTENERS_ENV, str(error))
        self.assertIn("has no listener named 'txn'", str(error))

    def test_unexpectedName(self):
        http, txn = self.listening(), self.listening()
        env = {LISTENERS_ENV: f"http={self.inherited(http)},txn={self.inherited(txn)}"}
        error = self.assertRaises(HandoffError, inherit_listeners, env, {"http": socket.AF_INET})
        self.assertIn(LISTENERS_ENV, str(error))
        self.assertIn("passes 'txn'", str(error))

    def test_wrongFamily(self):
        http = self.listening()
        env = {LISTENERS_ENV: f"http={self.inherited(http)}"}
        error = self.assertRaises(HandoffError, inherit_listeners, env, {"http": socket.AF_INET6})
        self.assertIn(LISTENERS_ENV, str(error))
        self.assertIn("listener 'http'", str(error))
        self.assertIn("expected IPv6", str(error))

    def test_notListening(self):
        http = self.listening(listen=False)
        env = {LISTENERS_ENV: f"http={self.inherited(http)}"}
        error = self.assertRaises(HandoffError, inherit_listeners, env, {"http": socket.AF_INET})
        self.assertIn("listener 'http'", str(error))
        self.assertIn("not listening", str(error))

    def test_closedFd(self):
        http = self.listening()
        fd = os.dup(http.fileno())
        os.close(fd)
        error = self.assertRaises(
            HandoffError, inherit_listeners, {LISTENERS_ENV: f"http={fd}"}, {"http": None}
        )
        self.assertIn("is not open", str(error))

    def test_failureClosesSocketsAlreadyTaken(self):
        good, bad = self.listening(), self.listening(listen=False)
        env = {LISTENERS_ENV: f"http={self.inherited(good)},txn={self.inherited(bad)}"}
        before = _open_fds()
        self.assertRaises(HandoffError, inherit_listeners, env, {"http": None, "txn": None})
        self.assertEqual(_open_fds(), before)


class InheritReadyFdTests(SynchronousTestCase):
    def pipe(self):
        r, w = os.pipe()
        self.addCleanup(_close_quietly, r)
        self.addCleanup(_close_quietly, w)
        return r, w

    def assertRejected(self, environ, fragment):
        error = self.assertRaises(HandoffError, inherit_ready_fd, environ)
        self.assertIn(READY_FD_ENV, str(error))
        self.assertIn(fragment, str(error))

    def test_acceptsPipeWriteEnd(self):
        r, w = self.pipe()
        self.assertEqual(inherit_ready_fd({READY_FD_ENV: str(w)}), w)
        self.assertTrue(_is_open(w))

    def test_missingVariable(self):
        self.assertRejected({}, "is missing")

    def test_notANumber(self):
        self.assertRejected({READY_FD_ENV: "four"}, "'four' is not a file descriptor number")

    def test_stdio(self):
        self.assertRejected({READY_FD_ENV: "1"}, "fd 1 is stdin/stdout/stderr")

    def test_closedFd(self):
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        self.assertRejected({READY_FD_ENV: str(w)}, f"fd {w} is not open")

    def test_regularFile(self):
        f = tempfile.TemporaryFile()
        self.addCleanup(f.close)
        self.assertRejected({READY_FD_ENV: str(f.fileno())}, "is not a pipe")

    def test_socket(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertRejected({READY_FD_ENV: str(a.fileno())}, "is not a pipe")


class InheritGenerationTests(SynchronousTestCase):
    def test_absentIsFirstGeneration(self):
        self.assertEqual(inherit_generation({}), 1)

    def test_two(self):
        self.assertEqual(inherit_generation({GENERATION_ENV: "2"}), 2)

    def test_large(self):
        self.assertEqual(inherit_generation({GENERATION_ENV: "41"}), 41)

    def assertRejected(self, text):
        error = self.assertRaises(HandoffError, inherit_generation, {GENERATION_ENV: text})
        self.assertIn(GENERATION_ENV, str(error))
        self.assertIn("not a generation number", str(error))

    def test_oneRejected(self):
        self.assertRejected("1")

    def test_zeroRejected(self):
        self.assertRejected("0")

    def test_negativeRejected(self):
        self.assertRejected("-3")

    def test_garbageRejected(self):
        self.assertRejected("x")

    def test_emptyRejected(self):
        self.assertRejected("")

    def test_absurdlyLongIsRejectedBriefly(self):
        error = self.assertRaises(HandoffError, inherit_generation,
                                  {GENERATION_ENV: "9" * 100000})
        self.assertLess(len(str(error)), 400)


class InheritParentPidTests(SynchronousTestCase):
    def test_pid(self):
        self.assertEqual(handoff.inherit_parent_pid({handoff.PARENT_PID_ENV: "4242"}), 4242)

    def test_absurd_values_are_one_short_error(self):
        # 5000 digits passed isdigit() and made int() raise: a traceback.
        for text in ("9" * 5000, "99999999999999999999", "0", "x"):
            error = self.assertRaises(HandoffError, handoff.inherit_parent_pid,
                                      {handoff.PARENT_PID_ENV: text})
            self.assertIn(handoff.PARENT_PID_ENV, str(error))
            self.assertLess(len(str(error)), 400)


class InheritStdioFdsTests(SynchronousTestCase):
    def pipe(self):
        r, w = os.pipe()
        self.addCleanup(_close_quietly, r)
        self.addCleanup(_close_quietly, w)
        return r, w

    def assertRejected(self, text, fragment):
        error = self.assertRaises(HandoffError, inherit_stdio_fds, {STDIO_FDS_ENV: text})
        self.assertIn(STDIO_FDS_ENV, str(error))
        self.assertIn(fragment, str(error))

    def test_absent(self):
        self.assertIsNone(inherit_stdio_fds({}))

    def test_empty(self):
        self.assertIsNone(inherit_stdio_fds({STDIO_FDS_ENV: ""}))

    def test_twoOpenFds(self):
        _, out = self.pipe()
        _, err = self.pipe()
        self.assertEqual(inherit_stdio_fds({STDIO_FDS_ENV: f"{out},{err}"}), (out, err))

    def test_oneFdRejected(self):
        self.assertRejected("5", "expected two fds")

    def test_threeFdsRejected(self):
        self.assertRejected("5,6,7", "expected two fds")

    def test_garbageRejected(self):
        self.assertRejected("out,err", "'out' is not a file descriptor number")

    def test_wholeValueQuoted(self):
        self.assertRejected("5,err", "GRACEFUL_STDIO_FDS='5,err'")

    def test_stdioRejected(self):
        self.assertRejected("1,2", "stdin/stdout/stderr")

    def test_closedFdRejected(self):
        _, out = self.pipe()
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        self.assertRejected(f"{out},{w}", f"fd {w} is not open")


class InheritReadyTimeoutTests(SynchronousTestCase):
    def assertRejected(self, text):
        error = self.assertRaises(HandoffError, inherit_ready_timeout, {READY_TIMEOUT_ENV: text})
        self.assertIn(READY_TIMEOUT_ENV, str(error))
        self.assertIn("not a positive number of seconds", str(error))

    def test_absentGivesDefault(self):
        self.assertEqual(inherit_ready_timeout({}), 30.0)

    def test_absentGivesGivenDefault(self):
        self.assertEqual(inherit_ready_timeout({}, default=5), 5)

    def test_fractional(self):
        self.assertEqual(inherit_ready_timeout({READY_TIMEOUT_ENV: "2.5"}), 2.5)

    def test_zeroRejected(self):
        self.assertRejected("0")

    def test_negativeRejected(self):
        self.assertRejected("-1")

    def test_garbageRejected(self):
        self.assertRejected("soon")

    def test_nanRejected(self):
        self.assertRejected("nan")

    def test_infinityRejected(self):
        self.assertRejected("inf")
        self.assertRejected("1e999")


class ForgetHandoffTests(SynchronousTestCase):
    def test_removesOnlyHandoffVariables(self):
        environ = {name: "x" for name in HANDOFF_VARIABLES}
        environ.update({"PATH": "/bin", "NOTIFY_SOCKET": "/run/n", "GRACEFUL_OTHER": "y"})
        forget_handoff(environ)
        self.assertEqual(environ, {"PATH": "/bin", "NOTIFY_SOCKET": "/run/n", "GRACEFUL_OTHER": "y"})

    def test_absentVariablesAreFine(self):
        environ = {"PATH": "/bin"}
        forget_handoff(environ)
        self.assertEqual(environ, {"PATH": "/bin"})

    def test_coversEveryHandoffVariable(self):
        """
        Every variable is forgotten once read, but the master's re-exec
        count, which stays for its next image, and the number of workers,
        which a worker reads when it needs it.
        """
        names = {getattr(handoff, n) for n in dir(handoff) if n.endswith("_ENV")}
        self.assertEqual(names, set(HANDOFF_VARIABLES) | set(handoff.MASTER_VARIABLES)
                         | {handoff.MASTER_EXECS_ENV, handoff.WORKERS_ENV})


def _close_quietly(fd):
    try:
        os.close(fd)
    except OSError:
        pass


def _open_fds():
    return {int(fd) for fd in os.listdir("/proc/self/fd") if _is_open(int(fd))}


class ParseReadyMessageTests(SynchronousTestCase):
    """
    L{twisted_graceful.child.parse_ready_message} reads the child's
    C{READY <pid>} line off the ready pipe, possibly in pieces.
    """

    def parse(self, data):
        from twisted_graceful.handoff import parse_ready_message

        return parse_ready_message(data)

    def test_completeMessage(self):
        self.assertEqual(self.parse(b"READY 1234\n"), 1234)

    def test_matchesWhatTheChildWrites(self):
        from twisted_graceful.handoff import READY_MESSAGE

        self.assertEqual(self.parse(READY_MESSAGE % (77,)), 77)

    def test_trailingDataIgnored(self):
        self.assertEqual(self.parse(b"READY 1234\nmore"), 1234)

    def test_emptyIsPartial(self):
        self.assertIsNone(self.parse(b""))

    def test_prefixIsPartial(self):
        self.assertIsNone(self.parse(b"REA"))

    def test_withoutNewlineIsPartial(self):
        self.assertIsNone(self.parse(b"READY 12"))

    def test_garbage(self):
        self.assertRaises(ValueError, self.parse, b"HELLO\n")

    def test_garbageWithoutNewline(self):
        self.assertRaises(ValueError, self.parse, b"HELLO")

    def test_lowercase(self):
        self.assertRaises(ValueError, self.parse, b"ready 12\n")

    def test_tooLongWithoutNewline(self):
        self.assertRaises(ValueError, self.parse, b"READY " + b"1" * 100)

    def test_nonNumericPid(self):
        self.assertRaises(ValueError, self.parse, b"READY abc\n")

    def test_missingPid(self):
        self.assertRaises(ValueError, self.parse, b"READY \n")


class InheritMasterWorkersTests(SynchronousTestCase):
    """
    The workers a re-executed master adopts, as its previous self wrote them.
    """

    def inherit(self, text):
        return handoff.inherit_master_workers({handoff.MASTER_WORKERS_ENV: text})

    def test_workers(self):
        self.assertEqual(self.inherit("4242:3,4243:2:draining"),
                         [(4242, 3, False), (4243, 2, True)])

    def test_absurd_numbers_are_one_short_error(self):
        # 5000 digits passed isdigit() and made int() raise: a traceback.
        for text in ("9" * 5000 + ":1", "4242:" + "9" * 5000, "4242:1," * 5000 + "x"):
            error = self.assertRaises(HandoffError, self.inherit, text)
            self.assertIn(handoff.MASTER_WORKERS_ENV, str(error))
            self.assertLess(len(str(error)), 400)
