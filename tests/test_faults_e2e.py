"""
End to end, on real C{twistd graceful} processes (loopback only): clients that
half-close, clients that send a request's head slowly, oversized requests, and
a database whose directory is removed under a running server.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

from twisted.trial import unittest

from tests.e2e import ServerProcess, http_get
from tests.test_metrics_e2e import wait_metric
from tests.test_txn_e2e import TxnClient, db_rows, graceful

LOOPBACK = "tcp:0:interface=127.0.0.1"


def read_until_eof(sock, timeout=15.0):
    """
    Everything the server sends until it closes (a bounded wait).
    """
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the server did not close within {timeout} s; got {data!r}")


class HalfCloseTests(unittest.TestCase):
    """
    C{printf 'SET k 1\\r\\nGET k\\r\\nQUIT\\r\\n' | socat - TCP:...}: the client
    sends everything, then its FIN, and reads.
    """

    def setUp(self):
        self.server = graceful(self)
        _, self.ports = self.server.wait_listening()
        self.server.wait_ready(1)

    def script(self, text):
        with socket.create_connection(("127.0.0.1", self.ports["txn"]), timeout=15) as sock:
            sock.sendall(text)
            sock.shutdown(socket.SHUT_WR)
            return read_until_eof(sock).decode().split("\r\n")

    def test_every_reply_comes_back_after_the_fin(self):
        lines = self.script(b"SET k 1\r\nINCR k 2\r\nGET k\r\nQUIT\r\n")
        self.assertRegex(lines[0], r"^220 ")
        self.assertRegex(lines[1], r"^250 committed txid=\d+ k=1$")
        self.assertRegex(lines[2], r"^250 committed txid=\d+ k=3$")
        self.assertEqual(lines[3:], ["250 k=3", "221 bye", ""])

    def test_without_quit_the_server_closes_after_the_last_reply(self):
        lines = self.script(b"SET a 1\r\nGET a")
        self.assertRegex(lines[1], r"^250 committed txid=\d+ a=1$")
        self.assertEqual(lines[2:], ["250 a=1", ""])
        self.assertEqual(db_rows(self.server.db)[0], {"a": "1"})

    def test_open_transaction_at_the_fin_applies_nothing(self):
        lines = self.script(b"BEGIN\r\nSET b 1\r\n")
        self.assertEqual(lines[1:], ["250 begin", "250 queued", ""])
        self.assertNotIn("b", db_rows(self.server.db)[0])


class SlowHeadTests(unittest.TestCase):
    def test_partial_requests_do_not_hold_the_old_generation(self):
        """
        200 slowloris connections held an old generation for --drain-timeout
        + --abort-grace (65.9 s). A request whose head is incomplete has not
        started: the old generation closes it after --idle-grace with a 408.
        """
        server = ServerProcess(self, [
            "graceful", "--port", LOOPBACK, "--metrics-port", LOOPBACK, "--slow-every", "0",
            "--drain-timeout", "60", "--idle-grace", "0.5", "--header-timeout", "60",
            "--db", os.path.abspath(self.mktemp()) + ".sqlite3"]).start()
        old_pid, ports = server.wait_listening()
        server.wait_ready(1)
        slow = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", ports["http"]), timeout=15)
            self.addCleanup(sock.close)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: slow\r\nX-Slow: ")
            slow.append(sock)
        # Every one of them is the old generation's (accepted, not queued).
        wait_metric(ports["metrics"], "graceful_open_connections", 20, protocol="http")
        started = time.monotonic()
        server.signal(old_pid, signal.SIGHUP)
        server.wait_handover(1)
        for sock in slow:
            self.assertIn(b"HTTP/1.1 408 ", read_until_eof(sock, timeout=20))
        server.wait_exit_line(old_pid, timeout=20)
        self.assertLess(time.monotonic() - started, 30)
        status, body, _ = http_get(ports["http"], "/")
        self.assertEqual(status, 200)
        self.assertIn("generation 2", body)

    def test_head_timeout_and_oversized_requests(self):
        server = ServerProcess(self, [
            "graceful", "--port", LOOPBACK, "--slow-every", "0", "--header-timeout", "1",
            "--max-body", "1000",
            "--db", os.path.abspath(self.mktemp()) + ".sqlite3"]).start()
        _, ports = server.wait_listening()
        server.wait_ready(1)
        with socket.create_connection(("127.0.0.1", ports["http"]), timeout=15) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n")
            self.assertIn(b"HTTP/1.1 408 ", read_until_eof(sock))
        with socket.create_connection(("127.0.0.1", ports["http"]), timeout=15) as sock:
            sock.sendall(b"POST /kv/big HTTP/1.1\r\nHost: x\r\nContent-Length: 52428800\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")
            self.assertIn(b"HTTP/1.1 413 ", read_until_eof(sock))
        with socket.create_connection(("127.0.0.1", ports["http"]), timeout=15) as sock:
            sock.sendall(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(b"HTTP/1.1 414 ", read_until_eof(sock))
        status, _, _ = http_get(ports["http"], "/kv/big")
        self.assertEqual(status, 404)  # nothing was stored
        self.assertEqual(http_get(ports["http"], "/")[0], 200)


class LostDatabaseTests(unittest.TestCase):
    def test_commit_after_the_directory_is_removed_is_an_error(self):
        cwd = os.path.abspath(self.mktemp())
        data = os.path.join(cwd, "data")
        os.makedirs(data)
        server = ServerProcess(self, [
            "graceful", "--port", LOOPBACK, "--txn-port", LOOPBACK, "--slow-every", "0",
            "--db", os.path.join(data, "db.sqlite3")], cwd=cwd).start()
        _, ports = server.wait_listening()
        server.wait_ready(1)
        client = TxnClient(ports["txn"])
        self.addCleanup(client.close)
        self.assertRegex(client.ask("SET k 1"), r"^250 committed txid=1 k=1$")
        self.assertEqual(http_get(ports["http"], "/healthz")[0], 200)
        shutil.rmtree(data)
        reply = client.ask("SET k 2")
        self.assertRegex(reply, r"^557 database unusable \(the database file .* is gone")
        self.assertIn("will not succeed on retry", reply)
        server.wait_for(r"Store: the database file .* is gone")
        status, body, _ = http_get(ports["http"], "/healthz")
        self.assertEqual(status, 503)
        self.assertIn("is gone", body)
        # Recreating the directory does not make an acknowledged commit of
        # the lost file possible.
        os.makedirs(data)
        self.assertRegex(client.ask("INCR k"), r"^557 ")


def chattr(flag, path):
    return subprocess.run(["chattr", flag, path], capture_output=True).returncode == 0


class UnwritableDatabaseUpgradeTests(unittest.TestCase):
    """
    A database the server cannot write must fail the next generation's
    upgrade, not be declared ready. File modes do not stop root (the
    unprivileged checks are in test_store_faults); the immutable flag does.
    """

    def test_upgrade_onto_an_immutable_database_fails_and_the_old_one_serves(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("chattr +i needs root (test_store_faults covers users)")
        server = graceful(self)
        pid, ports = server.wait_listening()
        server.wait_ready(1)
        client = TxnClient(ports["txn"])
        self.addCleanup(client.close)
        self.assertRegex(client.ask("SET k 1"), r"^250 committed")
        if not chattr("+i", server.db):
            raise unittest.SkipTest("this filesystem has no immutable flag")
        self.addCleanup(chattr, "-i", server.db)
        server.signal(pid, signal.SIGHUP)
        server.wait_for(r"Upgrade failed: pid (\d+) exited with status \d+ before it was ready")
        server.wait_for(rf"--db {server.db}: this user \(uid 0\) cannot open it for writing")
        self.assertEqual(client.ask("GET k"), "250 k=1")
        status, body, _ = http_get(ports["http"], "/")
        self.assertEqual(status, 200)
        self.assertIn("generation 1", body)
