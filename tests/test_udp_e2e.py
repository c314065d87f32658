"""
The UDP listener with real processes: PINGs sent at 1,000 a second while the
server upgrades itself five times are all answered, each by exactly one
generation (without a master, and with two workers reading one socket);
the same with the datagram socket passed by systemd socket activation
(C{systemd-socket-activate --datagram}); and bad input: a bad
C{--udp-port}, a datagram socket passed where a stream socket is expected
and the reverse.
"""

import json
import os
import socket
import subprocess
import sys

from twisted.trial import unittest

from tests.datagrams import PingLoad, udp_drops
from tests.e2e import (
    MARKER_ENV,
    REPO,
    TWISTD,
    ClearErrorMixin,
    ServerProcess,
    free_port,
    listener_ports,
    wait_tcp_listening,
)
from tests.test_systemd_e2e import LAUNCHER, SOCKET_ACTIVATE

UPGRADES = 5
RATE = 1000  # PINGs per second
# The socket's receive buffer: what waits there while no process reads (the
# machine is shared and loaded) is not lost; beyond it the kernel drops.
RCVBUF = 4 << 20


def reload(server, timeout=60):
    """
    C{python -m twisted_graceful reload}: SIGHUP, and return once the new
    generation (or every new worker) serves.
    """
    return subprocess.run(
        [sys.executable, "-m", "twisted_graceful", "reload", "--pidfile", server.pidfile,
         "--timeout", str(timeout)],
        capture_output=True, text=True, timeout=timeout + 30,
        env=dict(os.environ, PYTHONPATH=REPO))


class PingsThroughUpgradesMixin:
    def udp_port(self, server):
        """
        The UDP port, from the status entry of a process that serves it.
        """
        entry = server.wait_status(
            lambda entries: next((e for e in entries.values()
                                  if "udp" in (e.get("listeners") or {})), None),
            "a process serving udp")
        return listener_ports(entry)["udp"]

    def assert_pings_through_upgrades(self, server, port, upgrades=UPGRADES, first=1,
                                      started=None):
        drops_before = udp_drops()
        load = PingLoad(port, rate=RATE).start()
        self.addCleanup(load.stop, 0)
        if started is not None:
            started()
        for _ in range(upgrades):
            result = reload(server)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr
                             + server.output(40))
        # The last generation serves a while too.
        sent_at_last_upgrade = load.count_sent()
        server.wait_status(lambda entries: load.count_sent() > sent_at_last_upgrade + 200,
                           "200 more PINGs sent")
        unanswered = load.stop()
        drops = udp_drops()
        sent = load.count_sent()
        self.assertGreater(sent, 1000)
        self.assertEqual(unanswered, [], f"{len(unanswered)} of {sent} PINGs unanswered "
                         f"(first: {unanswered[:5]}); kernel receive-buffer drops during the "
                         f"test: {None if drops is None else drops - drops_before}\n"
                         + server.output(40))
        self.assertEqual(load.answered_twice(), {})
        self.assertEqual(load.garbage, [])
        # Every generation answered some: the socket went from each to the next.
        self.assertEqual(load.generations(), list(range(first, first + upgrades + 1)))
        return load


class UpgradeTests(PingsThroughUpgradesMixin, unittest.TestCase):
    def start(self, *extra):
        db = os.path.join(os.path.abspath(self.mktemp()), "store.sqlite3")
        os.makedirs(os.path.dirname(db))
        server = ServerProcess(self, [
            "graceful", "--port", "tcp:0:interface=127.0.0.1", "--slow-every", "0",
            "--udp-port", f"udp:0:interface=127.0.0.1:rcvbuf={RCVBUF}", "--db", db,
            *extra]).start()
        return server

    def test_pings_through_five_upgrades_without_a_master(self):
        server = self.start("--workers", "0")
        server.wait_ready(1)
        port = self.udp_port(server)
        load = self.assert_pings_through_upgrades(server, port)
        # One generation at a time answers: each answer's generation has one pid.
        pids = load.pids_by_generation()
        self.assertTrue(all(len(p) == 1 for p in pids.values()), pids)

    def test_pings_through_five_upgrades_with_two_workers(self):
        server = self.start("--workers", "2")
        master = server.wait_pidfile()
        # One worker serving is not the master serving: a SIGHUP before every
        # first worker is ready is refused, and the reload would wait for ever.
        server.wait_entry(master, lambda e: e.get("state") == "serving",
                          "the master serving (both first workers ready)")
        port = self.udp_port(server)
        load = self.assert_pings_through_upgrades(server, port)
        # Both workers of a set read the one socket, and the master none.
        pids = load.pids_by_generation()
        self.assertNotIn(master, set().union(*pids.values()))
        self.assertEqual(len(pids[UPGRADES + 1]), 2, pids)

    def test_pings_through_a_master_reexec(self):
        """
        SIGUSR2: the master re-executes itself (same PID, same sockets) and
        upgrades its workers; the datagram socket goes through both, and a
        TLS listener beside it too (the master's new image loads no
        certificate; its new workers do).
        """
        import signal

        from tests.certs import write_certificate
        from tests.test_tls_e2e import https

        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        write_certificate(os.path.join(cwd, "cert.pem"), os.path.join(cwd, "key.pem"), "x")
        server = ServerProcess(self, [
            "graceful", "--port", "tcp:0:interface=127.0.0.1", "--slow-every", "0",
            "--udp-port", f"udp:0:interface=127.0.0.1:rcvbuf={RCVBUF}",
            "--tls-port", "ssl:0:privateKey=key.pem:certKey=cert.pem:interface=127.0.0.1",
            "--db", os.path.join(cwd, "store.sqlite3"), "--workers", "1"], cwd=cwd).start()
        master = server.wait_pidfile()
        port = self.udp_port(server)
        load = PingLoad(port, rate=RATE).start()
        self.addCleanup(load.stop, 0)
        server.signal(master, signal.SIGUSR2)
        server.wait_entry(master, lambda e: e.get("execs") == 1
                                  and e.get("generation") == 2 and e.get("state") == "serving",
                                  "re-executed, workers generation 2 serving", 90)
        sent = load.count_sent()
        server.wait_status(lambda entries: load.count_sent() > sent + 200, "200 more PINGs")
        self.assertEqual(load.stop(), [], server.output(40))
        self.assertEqual(load.generations(), [1, 2])
        self.assertEqual(server.read_pidfile(), master)
        tls = listener_ports(next(e for e in server.status().values()
                                  if e.get("generation") == 2 and "https" in e["listeners"]))
        status, body, _, name, connection = https(tls["https"])
        connection.close()
        self.assertEqual((status, name), (200, "x"))
        self.assertIn("(generation 2)", body)

    def test_status_and_metrics(self):
        server = self.start("--workers", "0")
        pid = server.wait_ready(1)
        entry = server.status()[pid]
        self.assertRegex(entry["listeners"]["udp"], r"^udp:127\.0\.0\.1:\d+$")
        port = listener_ports(entry)["udp"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            sock.sendto(b"<13>Dec  4 03:00:00 host app: a log line", ("127.0.0.1", port))
            sock.sendto(b"PING x", ("127.0.0.1", port))
            self.assertEqual(sock.recvfrom(512)[0], b"PONG x pid %d generation 1\n" % pid)
        import urllib.request

        from tests.e2e import metric_value

        with urllib.request.urlopen(
                f"http://127.0.0.1:{listener_ports(entry)['metrics']}/metrics", timeout=10) as r:
            text = r.read().decode()
        self.assertEqual(metric_value(text, "graceful_datagrams_total", protocol="udp",
                                      result="pong"), 1.0)
        self.assertEqual(metric_value(text, "graceful_datagrams_total", protocol="udp",
                                      result="log"), 1.0)


class SocketActivationTests(PingsThroughUpgradesMixin, unittest.TestCase):
    """
    C{systemd-socket-activate --datagram} passes the UDP socket (named
    C{udp}) and execs the server when the first datagram arrives; the
    server binds its other listeners itself.
    """

    def test_pings_through_upgrades_of_an_activated_datagram_socket(self):
        if SOCKET_ACTIVATE is None:
            raise unittest.SkipTest("systemd-socket-activate is not installed")
        port = free_port_udp()
        db = os.path.join(os.path.abspath(self.mktemp()), "store.sqlite3")
        os.makedirs(os.path.dirname(db))
        server = ServerProcess(self, [
            "graceful", "--port", "tcp:0:interface=127.0.0.1", "--slow-every", "0",
            "--udp-port", f"systemd:udp:rcvbuf={RCVBUF}", "--db", db, "--workers", "2"])
        command = [SOCKET_ACTIVATE, "--datagram", "--fdname=udp", "-l", f"127.0.0.1:{port}"]
        for variable in ("PYTHONPATH", "PYTHONUNBUFFERED", "PATH", "HOME", MARKER_ENV):
            command += ["-E", f"{variable}={server.env.get(variable, '')}"]
        server.command = command + server.command
        server.start()
        wait_tcp_listening(port, server.proc.pid, server.output, udp=True)
        # The first datagram starts the server; it waits in the socket's
        # queue and is answered once the first workers serve.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first:
            first.settimeout(60)
            first.sendto(b"PING first", ("127.0.0.1", port))
            reply = first.recvfrom(512)[0]
        self.assertRegex(reply, rb"^PONG first pid \d+ generation 1\n$")
        master = server.wait_pidfile()
        self.assertEqual(master, server.proc.pid)  # systemd-socket-activate exec'ed twistd
        server.wait_entry(master, lambda e: e.get("state") == "serving",
                          "the master serving (both first workers ready)")
        self.assert_pings_through_upgrades(server, port, upgrades=3)
        self.assertEqual(self.udp_port(server), port)  # what the workers say they serve


def free_port_udp():
    """
    A UDP port nothing uses now (ephemeral ports are per protocol).
    """
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class BadInputTests(ClearErrorMixin, unittest.TestCase):
    """
    Each is a one-line error naming the option, without a traceback.
    """

    def run_twistd(self, *args, objects=(), env=None):
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        fds = [o.fileno() for o in objects]
        config = {"fds": fds, "env": env or {}, "pid": "self" if fds else None}
        return subprocess.run(
            [sys.executable, "-c", LAUNCHER, json.dumps(config), TWISTD, "--nodaemon",
             "--pidfile", os.path.join(cwd, "t.pid"), "graceful", "--db",
             os.path.join(cwd, "db.sqlite3"), "--port", "tcp:0:interface=127.0.0.1",
             "--txn-port", "tcp:0:interface=127.0.0.1", "--metrics-port",
             "tcp:0:interface=127.0.0.1", "--workers", "0"] + list(args),
            cwd=cwd, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
            timeout=60, pass_fds=fds)

    def test_bad_udp_port(self):
        self.assertClearError(self.run_twistd("--udp-port", "tcp:5140"),
                              "--udp-port 'tcp:5140': unsupported listener type 'tcp'",
                              "--port takes tcp:", "udp:PORT")
        self.assertClearError(self.run_twistd("--udp-port", "udp:none"),
                              "--udp-port 'udp:none': port must be a number")
        self.assertClearError(self.run_twistd("--udp-port", "udp:0:interface=localhost"),
                              "'localhost' is not an IPv4 or IPv6 address")
        self.assertClearError(self.run_twistd("--udp-port", "udp:0:backlog=5:mode=1"),
                              "unknown parameter(s) mode")
        self.assertClearError(self.run_twistd("--port", "udp:8080"),
                              "--port 'udp:8080': unsupported listener type 'udp'",
                              "--udp-port takes udp:")

    def test_udp_port_in_use(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            self.assertClearError(
                self.run_twistd("--udp-port", f"udp:{port}:interface=127.0.0.1"),
                f"--udp-port udp:{port}:interface=127.0.0.1: cannot listen on 127.0.0.1 port "
                f"{port}: address already in use")

    def test_datagram_socket_where_a_stream_socket_is_expected(self):
        dgram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(dgram.close)
        dgram.bind(("127.0.0.1", 0))
        result = self.run_twistd("--port", "systemd:http", objects=[dgram],
                                 env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"})
        self.assertClearError(result, "--port systemd:http", "fd 3 named 'http'",
                              "is a datagram (UDP) socket, not a stream socket",
                              "datagram sockets go to --udp-port")

    def test_stream_socket_where_a_datagram_socket_is_expected(self):
        stream = socket.socket()
        self.addCleanup(stream.close)
        stream.bind(("127.0.0.1", 0))
        stream.listen()
        result = self.run_twistd("--udp-port", "systemd:udp", objects=[stream],
                                 env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "udp"})
        self.assertClearError(result, "--udp-port systemd:udp", "fd 3 named 'udp'",
                              "is a stream socket, not a datagram (UDP) socket")
