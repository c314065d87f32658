"""
End to end under systemd's socket activation, emulated by
C{systemd-socket-activate} (docs/design.md, fact 15): real twistd processes adopt the
passed sockets by name, upgrade through our own handoff, and tell a fake
NOTIFY_SOCKET (an AF_UNIX datagram socket owned by the test, reading the
sender's PID from SCM_CREDENTIALS like systemd) what they do.
"""

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from twisted.trial import unittest

from tests.e2e import (
    MARKER_ENV,
    REPO,
    TWISTD,
    ClearErrorMixin,
    ServerProcess,
    free_port,
    http_get,
    pid_in,
    wait_tcp_listening,
)
from tests.test_notify import NotifySocket

# Linux's values: PyPy 3.9's socket module has neither name.
SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


def free_ports(n):
    ports = set()
    for _ in range(50):
        ports.add(free_port())
        if len(ports) == n:
            return list(ports)
    raise AssertionError(f"no {n} distinct free ports")


class FakeSystemd(NotifySocket):
    """
    The receiving end of NOTIFY_SOCKET: datagrams with the sender's PID.
    """

    def __init__(self, testcase):
        NotifySocket.__init__(self, testcase)
        self.path = self.env_value
        self.sock.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
        self.received = []  # (sender pid, message)

    def receive(self, timeout=30.0):
        self.sock.settimeout(timeout)
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except socket.timeout:
            raise AssertionError(f"no datagram within {timeout} s; so far: {self.received}")
        pid = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        message = data.decode()
        self.received.append((pid, message))
        return pid, message


LISTENERS = ("metrics", "txn", "http")  # the order the sockets are passed in


def socket_activated(testcase, args, notify=None, python_args=None):
    """
    C{systemd-socket-activate} listening on three loopback ports, passed as
    fds 3, 4, 5 named metrics, txn and http (not the order of the options),
    exec'ing twistd graceful on the first connection.
    """
    if SOCKET_ACTIVATE is None:
        raise unittest.SkipTest("systemd-socket-activate is not installed")
    ports = dict(zip(LISTENERS, free_ports(len(LISTENERS))))
    server = ServerProcess(testcase, args)
    data = os.path.join(server.cwd, "data")
    os.makedirs(data)
    server.data = data
    server.command += ["--db", os.path.join(data, "db.sqlite3")]
    command = [SOCKET_ACTIVATE, f"--fdname={':'.join(LISTENERS)}"]
    for name in LISTENERS:
        command += ["-l", f"127.0.0.1:{ports[name]}"]
    # systemd-socket-activate passes only the variables given with -E (the
    # marker lets the test find every process of the server).
    for variable in ("PYTHONPATH", "PYTHONUNBUFFERED", "PATH", "HOME", MARKER_ENV):
        command += ["-E", f"{variable}={server.env.get(variable, '')}"]
    if notify is not None:
        command += ["-E", f"NOTIFY_SOCKET={notify.path}"]
    if python_args is not None:
        server.command = [sys.executable] + python_args + server.command[1:]
    server.command = command + server.command
    server.start()
    for port in ports.values():
        wait_tcp_listening(port, server.proc.pid, server.output)
    return server, ports


class Client:
    """
    Requests on fresh connections in a loop until stopped; records every
    result (a refused or reset connection is a failure).
    """

    def __init__(self, port):
        self.port = port
        self.results = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        deadline = time.monotonic() + 120
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                status, body, _ = http_get(self.port, timeout=20)
                self.results.append((status, pid_in(body)))
            except OSError as e:
                self.results.append(("error", repr(e)))

    def finish(self, testcase):
        self.stop.set()
        self.thread.join(30)
        failures = [r for r in self.results if r[0] != 200]
        testcase.assertEqual(failures, [])
        return {pid for _, pid in self.results}


GRACEFUL = ["graceful", "--port", "systemd:http", "--txn-port", "systemd:domain=INET:name=txn",
            "--metrics-port", "systemd:name=metrics", "--slow-every", "0"]


class SocketActivationTests(unittest.TestCase):
    def test_three_upgrades_serving_throughout(self):
        """
        The sockets systemd passed (in the other order than the options) are
        adopted by name; three SIGHUPs to the pidfile's PID hand them on
        through our own handoff while a client never sees an error; the
        LISTEN_* variables reach no later generation.
        """
        server, ports = socket_activated(self, GRACEFUL)
        # systemd-socket-activate execs twistd on the first connection.
        status, body, _ = http_get(ports["http"], timeout=30)
        first = pid_in(body)
        self.assertEqual(status, 200)
        self.assertEqual(first, server.proc.pid, "exec'd in place: LISTEN_PID is its PID")
        server.wait_ready(1)
        _, listened = server.wait_listening(1)
        self.assertEqual(listened, ports)
        client = Client(ports["http"])
        current = server.wait_pidfile(first)
        for generation in (1, 2, 3):
            server.signal(server.read_pidfile(), signal.SIGHUP)
            new = server.wait_handover(generation)
            self.assertEqual(server.wait_pidfile(new), new)
            server.wait_exit_line(current)
            with open(f"/proc/{new}/environ", "rb") as f:
                names = {item.split(b"=", 1)[0] for item in f.read().split(b"\0")}
            self.assertFalse({b"LISTEN_PID", b"LISTEN_FDS", b"LISTEN_FDNAMES"} & names)
            status, body, _ = http_get(ports["http"])
            self.assertEqual((status, pid_in(body)), (200, new))
            current = new
        with socket.create_connection(("127.0.0.1", ports["txn"]), timeout=10) as txn:
            self.assertTrue(txn.recv(100))  # the transaction port answers with a greeting
        status, _, _ = http_get(ports["metrics"], "/metrics")
        self.assertEqual(status, 200)
        served_by = client.finish(self)
        self.assertIn(current, served_by)
        self.assertGreater(len(client.results), 0)
        server.signal(current, signal.SIGTERM)
        server.wait_all_exited()

    def test_endpoints_imported_first(self):
        """
        Even when twisted.internet.endpoints was imported before twistd (it
        deletes LISTEN_PID and LISTEN_FDS, docs/design.md fact 7), the sockets are
        adopted.
        """
        launcher = (
            "import os, sys; import twisted.internet.endpoints; "
            "assert 'LISTEN_FDS' not in os.environ, 'endpoints did not consume LISTEN_FDS'; "
            "sys.argv = sys.argv[1:]; from twisted.scripts.twistd import run; run()"
        )
        server, ports = socket_activated(self, GRACEFUL, python_args=["-c", launcher])
        status, body, _ = http_get(ports["http"], timeout=30)
        self.assertEqual(status, 200, server.output())
        pid = server.wait_ready(1)
        server.signal(pid, signal.SIGTERM)
        server.wait_all_exited()


class NotifyTests(unittest.TestCase):
    def test_notify_sequence(self):
        """
        Start, two upgrades, a failed upgrade, a third upgrade and a
        shutdown: systemd hears exactly READY, then per upgrade RELOADING and
        (from the old process, once the pidfile names the child) MAINPID with
        READY, READY back after the failure, STOPPING only at the end.
        """
        notify = FakeSystemd(self)
        server, ports = socket_activated(self, GRACEFUL, notify=notify)
        status, body, _ = http_get(ports["http"], timeout=30)
        first = pid_in(body)
        sender, message = notify.receive()
        self.assertEqual((sender, message),
                         (first, f"READY=1\nSTATUS=serving as PID {first} (generation 1)"))
        current = first
        generation = 1

        def upgrade():
            os.kill(current, signal.SIGHUP)
            sender, message = notify.receive()
            self.assertEqual(sender, current)
            m = re.fullmatch(
                rf"RELOADING=1\nMONOTONIC_USEC=(\d+)\nSTATUS=upgrading to PID (\d+) "
                rf"\(generation {generation + 1}\); PID {current} \(generation {generation}\) "
                rf"serves meanwhile", message)
            self.assertIsNotNone(m, message)
            usec = int(m.group(1))
            self.assertLessEqual(usec, time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
            return int(m.group(2))

        def handed_over(child):
            nonlocal current, generation
            sender, message = notify.receive()
            # The pidfile already names the child when MAINPID= arrives.
            self.assertEqual(server.read_pidfile(), child)
            self.assertEqual(sender, current, "MAINPID= comes from the old main process")
            self.assertRegex(
                message,
                rf"\AMAINPID={child}\nREADY=1\nSTATUS=serving as PID {child} \(generation "
                rf"{generation + 1}\); PID {current} \(generation {generation}\) draining "
                rf"\d+ connections?\Z")
            server.wait_exit_line(current)
            if not message.endswith(" 0 connections"):
                # A connection the server had not yet seen closed: one more
                # line once it is gone, before the old process exits.
                sender, message = notify.receive()
                self.assertEqual(sender, current)
                self.assertRegex(message, rf"\ASTATUS=serving as PID {child} .* draining "
                                          rf"0 connections\Z")
            current, generation = child, generation + 1
            status, body, _ = http_get(ports["http"])
            self.assertEqual((status, pid_in(body)), (200, current))

        for _ in range(2):
            handed_over(upgrade())

        # A broken deploy: the next generation cannot open its database.
        os.rename(server.data, server.data + ".moved")
        child = upgrade()
        sender, message = notify.receive()
        self.assertEqual(sender, current)
        self.assertEqual(
            message,
            f"READY=1\nSTATUS=upgrade failed: pid {child} exited with status 1 before it was "
            f"ready; still serving as PID {current} (generation {generation})")
        server.assert_output(r"--db .*the directory does not exist")
        self.assertEqual(server.read_pidfile(), current)
        status, body, _ = http_get(ports["http"])
        self.assertEqual((status, pid_in(body)), (200, current))

        # Fixed: the next SIGHUP (after the backoff) succeeds.
        os.rename(server.data + ".moved", server.data)
        handed_over(upgrade())

        os.kill(current, signal.SIGTERM)
        sender, message = notify.receive()
        self.assertEqual(sender, current)
        self.assertRegex(message, rf"\ASTOPPING=1\nSTATUS=shutting down: PID {current} draining "
                                  rf"\d+ connections?\Z")
        while True:
            sender, message = notify.receive()
            self.assertEqual(sender, current)
            if message == f"STATUS=PID {current} drained; exiting":
                break
            self.assertRegex(message, rf"\ASTATUS=shutting down: PID {current} draining \d+ ")
        server.wait_all_exited()
        self.assertIsNone(notify.pending(), "nothing after the last process exited")
        everything = "\n".join(m for _, m in notify.received)
        self.assertEqual(everything.count("STOPPING=1"), 1)
        self.assertEqual(everything.count("MAINPID="), 3)
        # READY=1: the first generation, three handovers, one failed upgrade.
        self.assertEqual(everything.count("READY=1"), 5)
        ready_senders = [pid for pid, m in notify.received if "READY=1" in m]
        self.assertEqual(ready_senders[0], first)


class MasterTests(unittest.TestCase):
    def test_master_is_main(self):
        """
        With workers, systemd's sockets go to the master, the workers serve
        them, and systemd hears only the master: READY=1, then RELOADING=1
        and READY=1 per upgrade, never MAINPID=, STOPPING=1 at the end.
        """
        notify = FakeSystemd(self)
        server, ports = socket_activated(self, GRACEFUL + ["--workers", "2"], notify=notify)
        status, body, _ = http_get(ports["http"], timeout=30)
        self.assertEqual(status, 200)
        sender, message = notify.receive()
        master = server.read_pidfile()
        self.assertEqual(sender, master)
        self.assertRegex(message, rf"\AREADY=1\nSTATUS=master PID {master}: workers generation 1 "
                                  rf"serve \(PIDs \d+, \d+\)\Z")
        self.assertNotEqual(pid_in(body), master)  # a worker answered
        for generation in (2, 3):
            os.kill(master, signal.SIGHUP)
            sender, message = notify.receive()
            self.assertEqual(sender, master)
            self.assertRegex(message, rf"\ARELOADING=1\nMONOTONIC_USEC=\d+\nSTATUS=upgrading the "
                                      rf"workers to generation {generation};")
            sender, message = notify.receive()
            self.assertEqual(sender, master)
            self.assertRegex(message, rf"\AREADY=1\nSTATUS=master PID {master}: workers "
                                      rf"generation {generation} serve")
            status, body, _ = http_get(ports["http"])
            self.assertIn(f"(generation {generation})", body)
        os.kill(master, signal.SIGTERM)
        sender, message = notify.receive()
        self.assertEqual((sender, message.split("\n")[0]), (master, "STOPPING=1"))
        server.wait_all_exited()
        everything = "\n".join(m for _, m in notify.received)
        self.assertNotIn("MAINPID=", everything)
        self.assertEqual({pid for pid, _ in notify.received}, {master})


LAUNCHER = """
import fcntl, json, os, sys
config = json.loads(sys.argv[1])
# Out of the way first (a plain dup could land on 3 itself), then 3, 4, ...
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in config["fds"]]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
for fd in high:
    os.close(fd)
env = dict(os.environ)
env.update(config["env"])
if config.get("pid") == "self":
    env["LISTEN_PID"] = str(os.getpid())
os.execve(sys.executable, [sys.executable] + sys.argv[2:], env)
"""


class BadValueTests(ClearErrorMixin, unittest.TestCase):
    """
    Crafted socket activation variables and descriptors, as a broken unit
    file or wrapper would give them: each is a clear error, no traceback.
    """

    def run_twistd(self, *args, env=None, objects=(), pid="self"):
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        environment = dict(os.environ)
        environment["PYTHONPATH"] = REPO
        fds = [o.fileno() for o in objects]
        config = {"fds": fds, "env": env or {}, "pid": pid}
        return subprocess.run(
            [sys.executable, "-c", LAUNCHER, json.dumps(config), TWISTD, "--nodaemon",
             "--pidfile", os.path.join(cwd, "t.pid"), "graceful", "--db",
             os.path.join(cwd, "db.sqlite3")] + list(args),
            cwd=cwd, env=environment, capture_output=True, text=True, timeout=60,
            pass_fds=fds,
        )

    def listening(self):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        return sock

    OTHERS = ("--metrics-port", "tcp:0:interface=127.0.0.1")
    HTTP_ONLY = ("--port", "systemd:http", "--txn-port", "tcp:0:interface=127.0.0.1") + OTHERS

    def test_listen_pid_of_another_process(self):
        result = self.run_twistd(*self.HTTP_ONLY, objects=[self.listening()], pid="1",
                                 env={"LISTEN_PID": "1", "LISTEN_FDS": "1",
                                      "LISTEN_FDNAMES": "http"})
        self.assertClearError(result, "LISTEN_PID=1 names another process")

    def test_count_does_not_match_names(self):
        result = self.run_twistd(*self.HTTP_ONLY, objects=[self.listening(), self.listening()],
                                 env={"LISTEN_FDS": "2", "LISTEN_FDNAMES": "http"})
        self.assertClearError(result, "LISTEN_FDNAMES='http' names 1 socket(s)",
                              "LISTEN_FDS='2' passes 2")

    def test_bad_count(self):
        result = self.run_twistd(*self.HTTP_ONLY, objects=[self.listening()],
                                 env={"LISTEN_FDS": "many", "LISTEN_FDNAMES": "http"})
        self.assertClearError(result, "LISTEN_FDS='many' is not a positive number")

    def test_absurd_count_is_bounded_by_the_fd_limit(self):
        # Was a 25.8 MB message for 1000000 and gigabytes for 100000000.
        for count in ("1000000", "100000000"):
            result = self.run_twistd(*self.HTTP_ONLY, objects=[self.listening()],
                                     env={"LISTEN_FDS": count})
            self.assertClearError(result, f"LISTEN_FDS={count} passes more sockets than this "
                                          f"process can have", "RLIMIT_NOFILE")
            self.assertLess(len(result.stdout + result.stderr), 5000)

    def test_not_a_listening_socket(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        result = self.run_twistd(*self.HTTP_ONLY, objects=[a],
                                 env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"})
        self.assertClearError(result, "--port systemd:http", "fd 3 named 'http'",
                              "not listening")
        with open(os.devnull) as devnull:
            result = self.run_twistd(*self.HTTP_ONLY, objects=[devnull],
                                     env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"})
        self.assertClearError(result, "fd 3 is not a socket")

    def test_name_nobody_asked_for(self):
        result = self.run_twistd(
            "--port", "systemd:http", "--txn-port", "systemd:txn", *self.OTHERS,
            objects=[self.listening(), self.listening(), self.listening()],
            env={"LISTEN_FDS": "3", "LISTEN_FDNAMES": "metrics:txn:http"})
        self.assertClearError(result, "nobody asked for", "fd 3 named 'metrics'")

    def test_missing_name_is_named(self):
        result = self.run_twistd(
            "--port", "systemd:http", "--txn-port", "systemd:txn", *self.OTHERS,
            objects=[self.listening()],
            env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"})
        self.assertClearError(result, "--txn-port systemd:txn", "no socket named 'txn'")

    def test_systemd_listener_without_activation(self):
        result = self.run_twistd(*self.HTTP_ONLY, pid=None)
        self.assertClearError(result, "--port systemd:http", "LISTEN_FDS is not set")
