"""
End to end: a start-up error that is not a usage mistake (a port in use, a
database directory that does not exist, an inherited socket that is wrong)
is one line on stderr, without twistd's usage text, and exit status 1; a
real usage mistake keeps twistd's usage text. Each is checked to the
character.
"""

import os
import socket

from twisted.trial import unittest

from tests.e2e import run_twistd

LOOPBACK = "tcp:0:interface=127.0.0.1"


class StartupErrorTests(unittest.TestCase):
    def assertOneLine(self, result, line):
        self.assertEqual((result.returncode, result.stdout, result.stderr), (1, "", line + "\n"))

    def test_port_in_use(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            # A master (the default) binds before it starts any worker.
            result = run_twistd(self, "--port", f"tcp:{port}:interface=127.0.0.1",
                                "--workers", "1")
        self.assertOneLine(
            result, f"twistd graceful: --port tcp:{port}:interface=127.0.0.1: cannot listen on "
                    f"127.0.0.1 port {port}: address already in use (is another server running "
                    f"there? stop it or choose another address)")

    def test_metrics_port_in_use(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            result = run_twistd(self, "--port", LOOPBACK, "--metrics-port", f"tcp:{port}")
        self.assertOneLine(
            result, f"twistd graceful: --metrics-port tcp:{port}: cannot listen on 0.0.0.0 "
                    f"port {port}: address already in use (is another server running there? "
                    f"stop it or choose another address)")

    def test_database_directory_missing(self):
        missing = os.path.abspath(os.path.join(self.mktemp(), "no-such-dir", "kv.sqlite3"))
        result = run_twistd(self, "--port", LOOPBACK, "--db", missing)
        self.assertOneLine(
            result, f"twistd graceful: --db {missing}: the directory does not exist; create it "
                    f"or choose another --db")

    def test_inherited_socket_not_listening(self):
        a, b = socket.socketpair()
        with a, b:
            fd = a.fileno()
            value = f"http={fd},txn=90,metrics=91"
            result = run_twistd(self, "--port", LOOPBACK,
                                env={"GRACEFUL_LISTENERS": value}, pass_fds=(fd,))
        self.assertOneLine(
            result, f"twistd graceful: GRACEFUL_LISTENERS: listener 'http': fd {fd} "
                    f"is a socket that is not listening (the GRACEFUL_* variables are set by a "
                    f"running server for the process it starts; unset them to start a new "
                    f"server)")

    def test_a_usage_mistake_keeps_the_usage_text(self):
        result = run_twistd(self, "--port", "tcp:eighty")
        self.assertEqual(result.returncode, 1)
        self.assertIn("Usage: twistd [options]", result.stdout)
        self.assertIn("--slow-every=", result.stdout)  # our options, listed
        self.assertTrue(result.stdout.endswith(
            ": --port 'tcp:eighty': port must be a number from 0 to 65535, not 'eighty'\n"),
            result.stdout[-300:])
