"""
sd_notify: datagrams to a test-owned AF_UNIX socket standing in for systemd's
NOTIFY_SOCKET, and what L{SdNotifier} says at each event.
"""

import os
import re
import socket
import time

from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from twisted_graceful.drain import DrainTracker
from twisted_graceful.interfaces import IDrainableConnection
from twisted_graceful.lifecycle import UpgradeOutcome
from twisted_graceful.notify import SdNotifier, install_sd_notify, notify_address, sd_notify
from twisted_graceful.service import GracefulService

from tests.e2e import short_temp_dir


class NotifySocket:
    def __init__(self, testcase, abstract=False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        testcase.addCleanup(self.sock.close)
        if abstract:
            name = f"twisted-graceful-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            path = os.path.join(short_temp_dir(testcase), "notify")
            self.sock.bind(path)
            self.env_value = path
        self.sock.settimeout(5)
        self.environ = {"NOTIFY_SOCKET": self.env_value}

    def receive(self):
        return self.sock.recv(4096).decode()

    def pending(self):
        self.sock.setblocking(False)
        try:
            return self.sock.recv(4096).decode()
        except BlockingIOError:
            return None
        finally:
            self.sock.settimeout(5)


class SdNotifyTests(unittest.TestCase):
    def test_path(self):
        server = NotifySocket(self)
        self.assertTrue(sd_notify("READY=1\nSTATUS=hello", server.environ))
        self.assertEqual(server.receive(), "READY=1\nSTATUS=hello")

    def test_abstract(self):
        server = NotifySocket(self, abstract=True)
        self.assertTrue(server.env_value.startswith("@"))
        self.assertTrue(sd_notify("READY=1", server.environ))
        self.assertEqual(server.receive(), "READY=1")

    def test_unset_or_unsupported(self):
        self.assertIsNone(notify_address({}))
        self.assertFalse(sd_notify("READY=1", {}))
        self.assertFalse(sd_notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}))
        self.assertFalse(sd_notify("READY=1", {"NOTIFY_SOCKET": "relative/path"}))

    def test_socket_path_is_short_from_a_long_checkout(self):
        # A clone at /home/<user>/src/... puts _trial_temp deep enough that
        # AF_UNIX paths under it (107 bytes at most) cannot be bound.
        deep = os.path.abspath(self.mktemp())
        deep = os.path.join(deep, *(["a-long-directory-name"] * 6))
        os.makedirs(deep)
        here = os.getcwd()
        os.chdir(deep)
        self.addCleanup(os.chdir, here)
        server = NotifySocket(self)
        self.assertTrue(sd_notify("READY=1", server.environ))
        self.assertEqual(server.receive(), "READY=1")

    def test_nobody_listening_is_not_an_error(self):
        path = os.path.join(short_temp_dir(self), "gone")
        self.assertFalse(sd_notify("READY=1", {"NOTIFY_SOCKET": path}))


class FakeGraceful:
    def __init__(self, generation=1):
        self.reactor = Clock()
        self.tracker = DrainTracker(self.reactor)
        self.generation = generation


@implementer(IDrainableConnection)
class FakeConn:
    protocol_name = "http"
    drain_state = "open"
    transport = None

    def in_transaction(self):
        return False

    def close_at_boundary(self, idle_grace):
        pass

    def abort_connection(self):
        return True

    def describe(self):
        return "fake http connection (idle)"


class SdNotifierTests(unittest.TestCase):
    def setUp(self):
        self.sent = []
        self.graceful = FakeGraceful()
        self.notifier = SdNotifier(self.graceful, send=self.sent.append, pid=100)

    def tell(self, event, **details):
        """
        An event as the lifecycle sends it: with pid, generation and state.
        """
        payload = {"pid": 100, "generation": 1, "state": "serving"}
        payload.update(details)
        self.notifier(event, **payload)

    def test_first_generation_ready(self):
        self.tell("serving", generation=1, source="bound")
        self.assertEqual(self.sent, ["READY=1\nSTATUS=serving as PID 100 (generation 1)"])

    def test_handed_over_generation_is_silent_when_ready(self):
        self.tell("serving", generation=2, source="inherited")
        self.assertEqual(self.sent, [])

    def test_upgrade_started(self):
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.tell("upgrade-started", child_pid=200)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = self.sent[0].split("\n")
        self.assertEqual(lines[0], "RELOADING=1")
        usec = int(re.fullmatch(r"MONOTONIC_USEC=(\d+)", lines[1]).group(1))
        self.assertTrue(before <= usec <= after)
        self.assertEqual(lines[2], "STATUS=upgrading to PID 200 (generation 2); "
                                   "PID 100 (generation 1) serves meanwhile")

    def test_upgrade_failed(self):
        outcome = UpgradeOutcome("failed", 200, "pid 200 exited with status 1\nbefore it was ready")
        self.tell("upgrade-failed", outcome=outcome)
        self.assertEqual(self.sent, [
            "READY=1\nSTATUS=upgrade failed: pid 200 exited with status 1 before it was ready; "
            "still serving as PID 100 (generation 1)"])

    def test_handed_over_then_drained(self):
        conns = [FakeConn(), FakeConn()]
        for c in conns:
            self.graceful.tracker.add(c)
        self.tell("upgrade-ok", outcome=None)
        self.tell("handed-over", child_pid=200)
        self.assertEqual(self.sent, [
            "MAINPID=200\nREADY=1\nSTATUS=serving as PID 200 (generation 2); "
            "PID 100 (generation 1) draining 2 connections"])
        self.graceful.tracker.remove(conns[0])
        self.graceful.reactor.advance(1)
        self.assertEqual(self.sent[-1], "STATUS=serving as PID 200 (generation 2); "
                                        "PID 100 (generation 1) draining 1 connection")
        self.graceful.tracker.remove(conns[1])
        self.tell("drained", report=None)
        self.graceful.reactor.advance(5)
        self.assertEqual(self.sent[-1], "STATUS=serving as PID 200 (generation 2); "
                                        "PID 100 (generation 1) draining 0 connections")
        self.assertEqual(len(self.sent), 3)
        self.assertFalse(any("STOPPING" in m for m in self.sent))

    def test_handed_over_with_nothing_to_drain_says_it_once(self):
        self.tell("handed-over", child_pid=200)
        self.tell("drained", report=None)
        self.assertEqual(len(self.sent), 1)

    def test_took_back_announces_itself_as_main_pid(self):
        conn = FakeConn()
        self.graceful.tracker.add(conn)
        self.tell("handed-over", child_pid=200)
        self.tell("serving", source="took-back")
        self.assertEqual(self.sent[-1], "MAINPID=100\nREADY=1\nSTATUS=serving as PID 100 "
                                        "(generation 1)")
        # No "draining" status any more once it serves again.
        self.graceful.tracker.remove(conn)
        self.graceful.reactor.advance(5)
        self.assertEqual(len(self.sent), 2)

    def test_old_generation_stopping_says_nothing(self):
        self.tell("shutting-down", was_current=False)
        self.assertEqual(self.sent, [])

    def test_status_at_most_once_per_interval(self):
        conns = [FakeConn() for _ in range(5)]
        for c in conns:
            self.graceful.tracker.add(c)
        self.tell("shutting-down")
        self.assertEqual(self.sent, ["STOPPING=1\nSTATUS=shutting down: PID 100 draining "
                                     "5 connections"])
        for c in conns[:3]:
            self.graceful.tracker.remove(c)
        self.graceful.reactor.advance(1)
        self.assertEqual(self.sent[1:], ["STATUS=shutting down: PID 100 draining 2 connections"])
        self.tell("drained", report=None)
        self.assertEqual(self.sent[-1], "STATUS=PID 100 drained; exiting")


class InstallTests(unittest.TestCase):
    def test_nothing_without_notify_socket(self):
        graceful = GracefulService(Clock(), install_signal_handlers=False, environ={})
        self.assertIsNone(install_sd_notify(graceful, {}))
        self.assertEqual(graceful.lifecycle.observers, [])

    def test_observes_the_service(self):
        server = NotifySocket(self)
        graceful = GracefulService(Clock(), install_signal_handlers=False, environ={})
        notifier = install_sd_notify(graceful, server.environ)
        self.assertIn(notifier, graceful.lifecycle.observers)
        graceful.lifecycle.state = "serving"
        graceful.lifecycle._tell("serving", source="bound")
        self.assertEqual(server.receive(),
                         f"READY=1\nSTATUS=serving as PID {os.getpid()} (generation 1)")
        self.assertIsNone(server.pending())
