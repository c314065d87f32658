"""
GracefulService and Inheritance without a reactor running: what a generation
takes from its environment, what it hands the next one, and how it answers
everything the next one can do (a recorded spawnProcess, no real process).
"""

import os
import socket

from twisted.internet import defer, protocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest

from twisted_graceful.handoff import HandoffError
from twisted_graceful.inherit import Inheritance
from twisted_graceful.lineage import Lineage
from twisted_graceful.listeners import address_mismatch, parse_listen_description
from twisted_graceful.pidfile import read_pid
from twisted_graceful.service import GracefulService

from tests.test_drain import FakeConnection


class InheritanceTests(unittest.SynchronousTestCase):
    def listening(self, host="127.0.0.1"):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind((host, 0))
        sock.listen()
        return sock

    def handoff_env(self, sock):
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        fd = os.dup(sock.fileno())
        lineage = Lineage.create()
        self.addCleanup(lineage.close)
        return {"GRACEFUL_LISTENERS": f"http={fd}", "GRACEFUL_READY_FD": str(write),
                "GRACEFUL_GENERATION": "2", "GRACEFUL_PARENT_PID": "1",
                "GRACEFUL_LINEAGE_FD": str(lineage.fileno())}

    def test_inherits_the_same_address(self):
        sock = self.listening()
        port = sock.getsockname()[1]
        spec = parse_listen_description(f"tcp:{port}:interface=127.0.0.1")
        env = self.handoff_env(sock)
        inh = Inheritance.acquire({"http": spec}, env)
        self.addCleanup(inh.sockets["http"].close)
        self.addCleanup(os.close, inh.ready_fd)
        self.assertEqual(inh.sockets["http"].getsockname()[1], port)
        self.assertEqual(inh.generation, 2)
        self.assertNotIn("GRACEFUL_LISTENERS", env)  # not passed on to what we start

    def test_an_upgrade_cannot_move_a_listener(self):
        sock = self.listening()
        other = self.listening()  # its port is in use, so nobody else takes it
        spec = parse_listen_description(f"tcp:{other.getsockname()[1]}:interface=127.0.0.1")
        env = self.handoff_env(sock)
        error = self.assertRaises(HandoffError, Inheritance.acquire, {"http": spec}, env,
                                  options={"http": "--port"})
        self.assertIn("--port tcp:", str(error))
        self.assertIn(f"listens on tcp:127.0.0.1:{sock.getsockname()[1]}", str(error))
        self.assertIn("restart the server to change its address", str(error))

    def test_port_zero_matches_any_port(self):
        sock = self.listening()
        self.assertIsNone(address_mismatch(
            parse_listen_description("tcp:0:interface=127.0.0.1"), sock))

    def test_other_interface_is_a_mismatch(self):
        sock = self.listening()
        port = sock.getsockname()[1]
        self.assertEqual(
            address_mismatch(parse_listen_description(f"tcp:{port}"), sock),
            f"tcp:127.0.0.1:{port}")


class FakeListeningPort:
    """
    What C{adoptStreamPort} returns, recording whether it accepts.
    """

    def __init__(self, fileno, family):
        self._fileno = fileno
        self.socket = socket.socket(family, socket.SOCK_STREAM)  # for descriptions only
        self.reading = True
        self.listening = True

    def fileno(self):
        return self._fileno

    def startReading(self):
        self.reading = True

    def stopReading(self):
        self.reading = False

    def stopListening(self):
        self.listening = False
        self.reading = False
        self.socket.close()


class FakeProcessTransport:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def signalProcess(self, name):
        self.signals.append(name)


class SpawningReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} that records C{spawnProcess} and C{adoptStreamPort}.
    """

    def __init__(self):
        MemoryReactorClock.__init__(self)
        self.spawned = []
        self.ports = []
        self.next_pid = 4242

    def adoptStreamPort(self, fileno, family, factory):
        port = FakeListeningPort(os.dup(fileno), family)
        self.ports.append(port)
        return port

    def spawnProcess(self, proto, executable, args, env=None, path=None, uid=None, gid=None,
                     usePTY=False, childFDs=None):
        transport = FakeProcessTransport(self.next_pid)
        self.next_pid += 1
        self.spawned.append({"proto": proto, "executable": executable, "args": args,
                             "env": env, "path": path, "childFDs": childFDs,
                             "transport": transport})
        proto.makeConnection(transport)
        return transport


class GracefulServiceTests(unittest.TestCase):
    """
    L{GracefulService} with a recording reactor: what it hands the next
    generation, and how it answers each thing a child can do.
    """

    def setUp(self):
        self.reactor = SpawningReactor()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.pidfile = os.path.join(self.dir, "twistd.pid")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        self.service = GracefulService(
            self.reactor, pidfile=self.pidfile, environ={"PATH": "/bin", "KEEP": "me"},
            inheritance=Inheritance({"http": sock}, source="bound"),
            install_signal_handlers=False, relay_output=False, abort_grace=2.0,
            ready_timeout=10.0, drain_timeout=30.0,
            command=("/usr/bin/python3", ["python3", "-m", "twisted", "next"]))
        self.service.add_listener("http", "tcp:0:interface=127.0.0.1", protocol.Factory())
        self.service.startService()
        self.addCleanup(self.cleanup)
        self.port = self.reactor.ports[0]
        self.child_side = Lineage(self.service.lineage.fileno(), self.pidfile)

    def cleanup(self):
        if self.service.running:
            self.service.stopService()
        self.service.lineage.close()
        for port in self.reactor.ports:
            port.socket.close()
            try:
                os.close(port.fileno())
            except OSError:
                pass

    def spawn(self):
        self.assertEqual(self.service.upgrade("SIGHUP"), "started")
        return self.reactor.spawned[-1]

    def take_over(self, spawned):
        pid = spawned["transport"].pid
        self.assertIsNone(self.child_side.take_over(os.getpid(), pid, 2))
        spawned["proto"].childDataReceived(4, b"READY %d\n" % (pid,))
        return pid

    def test_serves_once_ready(self):
        self.assertEqual(self.service.state, "serving")
        self.assertTrue(self.port.reading)
        self.assertEqual(self.service.lineage.read()["current"], os.getpid())

    def test_what_the_next_generation_gets(self):
        spawned = self.spawn()
        fds = spawned["childFDs"]
        lineage_fd, out_fd, err_fd = 5, 6, 7
        self.assertEqual(fds, {0: 0, 1: "r", 2: "r", 3: self.port.fileno(), 4: "r",
                               lineage_fd: self.service.lineage.fileno(), out_fd: 1, err_fd: 2})
        env = spawned["env"]
        self.assertEqual(env["GRACEFUL_LISTENERS"], "http=3")
        self.assertEqual(env["GRACEFUL_READY_FD"], "4")
        self.assertEqual(env["GRACEFUL_LINEAGE_FD"], str(lineage_fd))
        self.assertEqual(env["GRACEFUL_STDIO_FDS"], f"{out_fd},{err_fd}")
        self.assertEqual(env["GRACEFUL_GENERATION"], "2")
        self.assertEqual(env["GRACEFUL_PARENT_PID"], str(os.getpid()))
        self.assertEqual(env["GRACEFUL_PIDFILE"], self.pidfile)
        self.assertEqual(env["GRACEFUL_READY_TIMEOUT"], "10.0")
        self.assertEqual((env["PATH"], env["KEEP"]), ("/bin", "me"))  # ours, passed on
        self.assertEqual(spawned["executable"], "/usr/bin/python3")
        self.assertEqual(self.service.lineage.read()["pending"], spawned["transport"].pid)

    def test_ready_child_takes_over(self):
        busy = FakeConnection(self.service.tracker, busy=True)
        spawned = self.spawn()
        pid = self.take_over(spawned)
        self.assertEqual(self.service.state, "draining")
        self.assertFalse(self.port.reading)
        self.assertTrue(self.port.listening)  # kept until the drain ends
        self.assertEqual(read_pid(self.pidfile), pid)
        self.assertEqual(spawned["transport"].signals, [])
        busy.finish_transaction()
        self.assertEqual(self.service.state, "exited")
        self.assertFalse(self.port.listening)

    def test_garbage_on_the_ready_pipe_then_term_then_kill(self):
        spawned = self.spawn()
        spawned["proto"].childDataReceived(4, b"HELLO\n")
        self.assertEqual(self.service.state, "serving")
        self.assertTrue(self.port.reading)
        self.assertEqual(spawned["transport"].signals, ["TERM"])
        self.reactor.advance(2.0)
        self.assertEqual(spawned["transport"].signals, ["TERM", "KILL"])
        self.assertIn("HELLO", self.service.lifecycle.last_outcome.error)

    def test_ready_for_another_pid(self):
        spawned = self.spawn()
        spawned["proto"].childDataReceived(4, b"READY 1\n")
        self.assertEqual(self.service.state, "serving")
        self.assertIn("not its own", self.service.lifecycle.last_outcome.error)
        self.assertEqual(spawned["transport"].signals, ["TERM"])

    def test_exit_before_ready(self):
        spawned = self.spawn()
        spawned["proto"].processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.assertEqual(self.service.state, "serving")
        self.assertIn("exited with status 1 before it was ready",
                      self.service.lifecycle.last_outcome.error)

    def test_not_ready_in_time_term_then_kill(self):
        spawned = self.spawn()
        self.reactor.advance(10.0)
        self.assertEqual(spawned["transport"].signals, ["TERM"])
        self.reactor.advance(2.0)
        self.assertEqual(spawned["transport"].signals, ["TERM", "KILL"])
        self.assertEqual(self.service.lifecycle.last_outcome.result, "timeout")

    def test_exit_after_handing_over_to_its_own_successor(self):
        busy = FakeConnection(self.service.tracker, busy=True)
        spawned = self.spawn()
        pid = self.take_over(spawned)
        self.child_side.expect(pid, 9000)
        self.assertIsNone(self.child_side.take_over(pid, 9000, 3))
        spawned["proto"].processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.service.state, "draining")
        self.assertFalse(self.port.reading)
        self.assertEqual(read_pid(self.pidfile), 9000)
        busy.finish_transaction()

    def test_death_after_takeover_is_taken_back(self):
        FakeConnection(self.service.tracker, busy=True)
        spawned = self.spawn()
        self.take_over(spawned)
        spawned["proto"].processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(self.service.state, "serving")
        self.assertTrue(self.port.reading)
        self.assertEqual(read_pid(self.pidfile), os.getpid())
        self.assertIn("was killed by SIGKILL after it took over",
                      self.service.lifecycle.last_outcome.error)

    def test_a_readiness_check_that_never_answers_fails_at_the_deadline(self):
        """
        A starting generation whose check hangs gives up once its ready
        timeout is over instead of starting for ever.
        """
        reactor = SpawningReactor()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        service = GracefulService(
            reactor, environ={}, inheritance=Inheritance({"http": sock}, source="bound"),
            install_signal_handlers=False, ready_timeout=10.0)
        service.add_listener("http", "tcp:0:interface=127.0.0.1", protocol.Factory())
        service.add_readiness_check(lambda: defer.Deferred())
        gave_up = []
        service._give_up = lambda status, why: gave_up.append((status, why))
        service.startService()
        self.addCleanup(lambda: [p.socket.close() for p in reactor.ports])
        reactor.advance(9.9)
        self.assertEqual(gave_up, [])
        reactor.advance(0.2)
        self.assertEqual(len(gave_up), 1)
        self.assertIn("not ready after 1 attempt(s)", gave_up[0][1])

    def test_stop_during_upgrade_waits_for_the_unready_child(self):
        spawned = self.spawn()
        d = self.service.stopService()
        self.assertEqual(spawned["transport"].signals, ["TERM"])
        self.assertFalse(self.port.listening)
        self.assertNoResult(d)
        spawned["proto"].processEnded(Failure(ProcessTerminated(signal=15)))
        self.successResultOf(d)
        self.assertEqual(self.service.state, "exited")


class ShareAcceptsTests(unittest.TestCase):
    """
    Workers sharing a listening socket take a few connections per wake-up,
    so that one worker does not take every queued connection.
    """

    def test_a_few_connections_per_wake_up(self):
        from twisted.internet import reactor

        from twisted_graceful._twisted import share_accepts

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        accepted = []

        class Count(protocol.Protocol):
            def connectionMade(self):
                accepted.append(self)
                self.transport.abortConnection()

        port = reactor.adoptStreamPort(sock.fileno(), socket.AF_INET,
                                       protocol.Factory.forProtocol(Count))
        self.addCleanup(port.stopListening)
        port.stopReading()  # the test calls doRead itself
        sock.close()
        share_accepts(port, per_wake_up=2)
        clients = [socket.create_connection(port.socket.getsockname()) for _ in range(5)]
        for client in clients:
            self.addCleanup(client.close)
        port.doRead()
        self.assertEqual(len(accepted), 2)
        port.doRead()  # Twisted raised numberAccepts after the first: still two
        self.assertEqual(len(accepted), 4)
