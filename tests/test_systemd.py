"""
Socket activation: parsing and validation of LISTEN_PID, LISTEN_FDS and
LISTEN_FDNAMES, with real sockets placed at consecutive descriptors (from a
high fd base instead of 3, which this process already uses).
"""

import fcntl
import os
import resource
import socket
import sys
import types
from collections import OrderedDict

from twisted.python.systemd import ListenFDs
from twisted.trial import unittest

from twisted_graceful import systemd
from twisted_graceful.inherit import Inheritance
from twisted_graceful.listeners import ListenerError, parse_listen_description

from tests.e2e import short_temp_dir

PID = 4242


def spec(description):
    return parse_listen_description(description)


class PassedFds:
    """
    Objects placed at C{base}, C{base+1}, ... like systemd passes them at 3, 4...
    """

    def __init__(self, testcase, objects, base=None):
        self.base = base or 600 + 20 * (id(testcase) % 7)
        self.fds = []
        for i, obj in enumerate(objects):
            fd = self.base + i
            os.dup2(obj.fileno(), fd)
            self.fds.append(fd)
            testcase.addCleanup(self._close, fd)

    @staticmethod
    def _close(fd):
        try:
            os.close(fd)
        except OSError:
            pass


def listening(testcase, family=socket.AF_INET):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(5)
    testcase.addCleanup(sock.close)
    return sock


def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class AdoptTests(unittest.TestCase):
    def environ(self, count, names=None, pid=PID):
        env = {"LISTEN_PID": str(pid), "LISTEN_FDS": str(count), "OTHER": "kept"}
        if names is not None:
            env["LISTEN_FDNAMES"] = names
        return env

    def test_by_name_in_any_order(self):
        """
        Sockets are matched by name whatever their order; each comes back
        non-blocking (they were passed blocking), the passed fds are closed,
        the variables are removed and listeners of other kinds are left alone.
        """
        metrics, txn, http = listening(self), listening(self), listening(self)
        for s in (metrics, txn, http):
            s.setblocking(True)
        passed = PassedFds(self, [metrics, txn, http])
        env = self.environ(3, "metrics:txn:http")
        specs = OrderedDict([
            ("http", spec("systemd:http")),
            ("txn", spec("systemd:domain=INET:name=txn")),
            ("metrics", spec("systemd:name=metrics")),
            ("other", spec("tcp:0")),
        ])
        sockets = systemd.adopt(specs, env, pid=PID, start=passed.base)
        self.addCleanup(lambda: [s.close() for s in sockets.values()])
        self.assertEqual(list(sockets), ["http", "txn", "metrics"])
        for name, original in [("http", http), ("txn", txn), ("metrics", metrics)]:
            self.assertEqual(sockets[name].getsockname(), original.getsockname())
            flags = fcntl.fcntl(sockets[name].fileno(), fcntl.F_GETFL)
            self.assertTrue(flags & os.O_NONBLOCK, f"{name} is still blocking")
        for fd in passed.fds:
            self.assertFalse(is_open(fd), f"passed fd {fd} left open")
        self.assertEqual(env, {"OTHER": "kept"})

    def test_by_index_when_unnamed(self):
        a, b = listening(self), listening(self)
        passed = PassedFds(self, [a, b])
        env = self.environ(2)
        sockets = systemd.adopt(
            OrderedDict([("http", spec("systemd:index=1")), ("txn", spec("systemd:index=0"))]),
            env, pid=PID, start=passed.base)
        self.addCleanup(lambda: [s.close() for s in sockets.values()])
        self.assertEqual(sockets["http"].getsockname(), b.getsockname())
        self.assertEqual(sockets["txn"].getsockname(), a.getsockname())
        self.assertNotIn("LISTEN_FDS", env)

    def test_unix_socket(self):
        path = os.path.join(short_temp_dir(self), "app.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(path)
        sock.listen(1)
        passed = PassedFds(self, [sock])
        sockets = systemd.adopt({"http": spec("systemd:http")}, self.environ(1, "http"),
                                pid=PID, start=passed.base)
        self.addCleanup(sockets["http"].close)
        self.assertEqual(sockets["http"].family, socket.AF_UNIX)
        self.assertEqual(sockets["http"].getsockname(), path)

    def assertError(self, env, specs, *fragments, objects=None, options=None):
        objects = objects if objects is not None else [listening(self)]
        passed = PassedFds(self, objects)
        with self.assertRaises(systemd.SystemdError) as cm:
            systemd.adopt(specs, env, options=options, pid=PID, start=passed.base)
        message = str(cm.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        # Nothing adopted: the variables stay, the fds are left as they were.
        for fd in passed.fds:
            self.assertTrue(is_open(fd))
        return message

    HTTP = {"http": parse_listen_description("systemd:http", "--port")}
    OPTIONS = {"http": "--port"}

    def test_listen_pid_of_another_process(self):
        self.assertError(self.environ(1, "http", pid=PID + 1), self.HTTP,
                         f"LISTEN_PID={PID + 1} names another process", f"this is pid {PID}")

    def test_listen_pid_of_parent_says_exec(self):
        with self.assertRaises(systemd.SystemdError) as cm:
            systemd.parse_passed_sockets(self.environ(1, "http", pid=os.getppid()))
        self.assertIn("must exec it", str(cm.exception))

    def test_listen_pid_garbage(self):
        self.assertError(self.environ(1, "http", pid="abc"), self.HTTP,
                         "LISTEN_PID='abc' is not a process ID")

    def test_listen_pid_missing(self):
        self.assertError({"LISTEN_FDS": "1"}, self.HTTP, "LISTEN_PID is not")

    def test_listen_fds_missing(self):
        self.assertError({"LISTEN_PID": str(PID)}, self.HTTP, "LISTEN_FDS is not")

    def test_listen_fds_not_positive(self):
        for value in ("0", "-2", "two", ""):
            env = self.environ(1, "http")
            env["LISTEN_FDS"] = value
            self.assertError(env, self.HTTP,
                             f"LISTEN_FDS={value!r} is not a positive number of sockets")

    def test_listen_fds_beyond_the_fd_limit(self):
        # LISTEN_FDS=1000000 built a 25 MB message; 100000000 ran for minutes
        # at gigabytes: the count is bounded before anything is built from it.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = soft if soft != resource.RLIM_INFINITY else hard
        for count in (limit, 1000000, 100000000, 10 ** 30):
            env = self.environ(1)
            env["LISTEN_FDS"] = str(count)
            message = self.assertError(env, self.HTTP, "LISTEN_FDS", "RLIMIT_NOFILE")
            self.assertLess(len(message), 400)

    def test_long_listing_is_shortened(self):
        objects = [listening(self) for _ in range(30)]
        env = self.environ(30, ":".join(f"s{i}" for i in range(30)))
        message = self.assertError(env, {"http": parse_listen_description("systemd:http", "--port")},
                                   "no socket named 'http'", "and 2", objects=objects)
        self.assertLess(len(message), 1500)

    def test_names_do_not_match_count(self):
        self.assertError(self.environ(2, "http"), self.HTTP,
                         "LISTEN_FDNAMES='http' names 1 socket(s)", "LISTEN_FDS='2' passes 2",
                         objects=[listening(self), listening(self)])
        self.assertError(self.environ(1, "http:txn"), self.HTTP,
                         "LISTEN_FDNAMES='http:txn' names 2 socket(s)")

    def test_not_a_socket(self):
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        pipe = types.SimpleNamespace(fileno=lambda: r)
        self.assertError(self.environ(1, "http"), self.HTTP, "--port systemd:http",
                         "named 'http'", "is not a socket", objects=[pipe],
                         options=self.OPTIONS)

    def test_not_listening(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertError(self.environ(1, "http"), self.HTTP, "not listening", objects=[a])

    def test_datagram_socket(self):
        d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(d.close)
        d.bind(("127.0.0.1", 0))
        self.assertError(self.environ(1, "http"), self.HTTP, "not a stream socket",
                         objects=[d])

    def test_fd_not_open(self):
        env = self.environ(1, "http")
        with self.assertRaises(systemd.SystemdError) as cm:
            systemd.adopt(self.HTTP, env, pid=PID, start=900)
        self.assertIn("fd 900 is not open", str(cm.exception))

    def test_socket_nobody_asked_for(self):
        message = self.assertError(
            self.environ(2, "http:metrics"), self.HTTP,
            "nobody asked for", "named 'metrics'", "--port systemd:http",
            objects=[listening(self), listening(self)], options=self.OPTIONS)
        self.assertNotIn("named 'http'", message.split("nobody asked for")[1].split("(")[0])

    def test_passed_but_no_systemd_listener(self):
        self.assertError(self.environ(1, "http"), {"http": spec("tcp:0")},
                         "nobody asked for", "sockets: none")

    def test_missing_name_is_named(self):
        specs = OrderedDict([("http", spec("systemd:http")), ("txn", spec("systemd:txn"))])
        self.assertError(self.environ(1, "http"), specs, "--txn-port systemd:txn",
                         "no socket named 'txn'", "FileDescriptorName=txn",
                         options={"http": "--port", "txn": "--txn-port"})

    def test_name_asked_but_sockets_unnamed(self):
        self.assertError(self.environ(1), self.HTTP, "no socket named 'http'",
                         "LISTEN_FDNAMES is not set", "systemd:index=N")

    def test_duplicate_name(self):
        self.assertError(self.environ(2, "http:http"), self.HTTP, "2 sockets are named 'http'",
                         objects=[listening(self), listening(self)])

    def test_index_out_of_range(self):
        self.assertError(self.environ(1), {"http": spec("systemd:index=3")},
                         "index 3 is out of range", "passes 1 socket(s)")

    def test_index_and_name_disagree(self):
        self.assertError(self.environ(2, "http:txn"), {"http": spec("systemd:name=http:index=1")},
                         "index 1 is named 'txn', not 'http'",
                         objects=[listening(self), listening(self)])

    def test_two_listeners_one_socket(self):
        specs = OrderedDict([("http", spec("systemd:http")), ("txn", spec("systemd:index=0"))])
        self.assertError(self.environ(1, "http"), specs, "both ask for the same socket")


class AcquireTests(unittest.TestCase):
    def test_listen_pid_of_another_process(self):
        """
        Inheritance.acquire sees LISTEN_* and refuses what is not ours, as a
        ListenerError (a usage error for twistd).
        """
        env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}
        with self.assertRaises(ListenerError) as cm:
            Inheritance.acquire({"http": spec("systemd:http")}, env)
        self.assertIn("LISTEN_PID=1 names another process", str(cm.exception))

    def test_systemd_listener_without_activation(self):
        with self.assertRaises(ListenerError) as cm:
            Inheritance.acquire({"http": spec("systemd:http")}, {})
        self.assertIn("LISTEN_FDS is not set", str(cm.exception))

    def test_handoff_wins(self):
        """
        With both the handoff and LISTEN_* present (a systemd-started process
        starting its next generation), the handoff is used and LISTEN_* are
        not even parsed.
        """
        sock = listening(self)
        fd = os.dup(sock.fileno())
        env = {"GRACEFUL_LISTENERS": f"http={fd}", "GRACEFUL_READY_FD": "x",
               "LISTEN_PID": "1", "LISTEN_FDS": "1"}
        with self.assertRaises(ListenerError) as cm:
            Inheritance.acquire({"http": spec("systemd:http")}, env)
        os.close(fd) if is_open(fd) else None
        self.assertIn("GRACEFUL_READY_FD", str(cm.exception))
        self.assertNotIn("LISTEN_PID", str(cm.exception))


class EnvironmentSourceTests(unittest.TestCase):
    """
    Where the variables come from when C{os.environ} lost them.
    """

    def setUp(self):
        for name in systemd.LISTEN_VARIABLES:
            self.assertNotIn(name, os.environ)
        self.patch(systemd, "_adopted", False)

    def test_explicit_environ_is_taken_as_is(self):
        self.patch(systemd, "_early", (os.getpid(), {"LISTEN_FDS": "1"}))
        self.assertEqual(systemd.listen_variables({}), {})
        self.assertFalse(systemd.is_socket_activated({}))

    def test_early_copy(self):
        early = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
        self.patch(systemd, "_early", (os.getpid(), early))
        self.assertEqual(systemd.listen_variables(), early)
        self.assertTrue(systemd.is_socket_activated())

    def test_early_copy_of_another_process_is_ignored(self):
        # Taken before a fork: not ours.
        self.patch(systemd, "_early", (os.getpid() + 1, {"LISTEN_FDS": "2"}))
        self.assertEqual(systemd.listen_variables(), {})

    def fake_endpoints(self, listen_fds):
        module = types.ModuleType("fake_endpoints")
        module._SystemdParser = types.SimpleNamespace(_sddaemon=listen_fds)
        name = "twisted.internet.endpoints"
        saved = sys.modules.get(name)
        sys.modules[name] = module

        def restore():
            if saved is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved

        self.addCleanup(restore)

    def test_recovered_from_twisted_endpoints(self):
        self.patch(systemd, "_early", (os.getpid(), {}))
        self.fake_endpoints(ListenFDs([3, 4], ("http", "txn")))
        self.assertEqual(systemd.listen_variables(), {
            "LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "http:txn"})

    def test_consumed_by_twisted_with_mismatched_names(self):
        self.patch(systemd, "_early", (os.getpid(), {}))
        self.fake_endpoints(ListenFDs([], ()))
        os.environ["LISTEN_FDNAMES"] = "http:txn"
        self.addCleanup(os.environ.pop, "LISTEN_FDNAMES", None)
        with self.assertRaises(systemd.SystemdError) as cm:
            systemd.listen_variables()
        self.assertIn("twisted.internet.endpoints consumed them", str(cm.exception))

    def test_nothing_after_adoption(self):
        self.patch(systemd, "_early", (os.getpid(), {"LISTEN_FDS": "1"}))
        self.patch(systemd, "_adopted", True)
        self.assertFalse(systemd.is_socket_activated())
