"""
The TLS listener with real processes and certificates made in the test:
rotation by upgrade (new connections see the new certificate, a keep-alive
connection opened before is still answered, by the old generation, with
the old one), a broken certificate file that fails the upgrade while the
old generation serves on, and a key that does not match its certificate,
refused at start and at an upgrade. Without a master and under one.
"""

import http.client
import os
import subprocess
import sys

from twisted.trial import unittest

from tests.certs import client_context, peer_common_name, write_certificate
from tests.e2e import (
    MARKER_ENV,
    REPO,
    TWISTD,
    ClearErrorMixin,
    ServerProcess,
    free_port,
    listener_ports,
    pid_in,
    wait_tcp_listening,
)
from tests.test_systemd_e2e import SOCKET_ACTIVATE
from tests.test_udp_e2e import reload


def https(port, path="/", connection=None):
    """
    One GET over TLS (on C{connection}, kept open, or a fresh one); return
    (status, body, connection header, the certificate's common name, the
    connection).
    """
    if connection is None:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(),
                                                 timeout=20)
    connection.request("GET", path)
    name = peer_common_name(connection.sock)  # before a "Connection: close" response closes it
    response = connection.getresponse()
    body = response.read().decode()
    return response.status, body, response.getheader("connection"), name, connection


class TLSTestCase(unittest.TestCase):
    workers = "0"

    def start(self):
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)
        self.cert = os.path.join(self.cwd, "cert.pem")
        self.key = os.path.join(self.cwd, "key.pem")
        write_certificate(self.cert, self.key, "first")
        # Relative to the working directory, as an operator writes them.
        server = ServerProcess(self, [
            "graceful", "--port", "tcp:0:interface=127.0.0.1", "--slow-every", "0",
            "--tls-port", "ssl:0:privateKey=key.pem:certKey=cert.pem:interface=127.0.0.1",
            "--db", os.path.join(self.cwd, "store.sqlite3"), "--workers", self.workers,
            # The keep-alive connection opened before an upgrade may send its
            # next request well after the handover.
            "--idle-grace", "30"], cwd=self.cwd).start()
        return server

    def tls_port(self, server):
        entry = server.wait_status(
            lambda entries: next((e for e in entries.values()
                                  if "https" in (e.get("listeners") or {})
                                  and e.get("serving_since")), None),
            "a process serving https")
        self.assertRegex(entry["listeners"]["https"], r"^ssl:127\.0\.0\.1:\d+$")
        return listener_ports(entry)["https"]

    def test_rotation_by_upgrade(self):
        server = self.start()
        port = self.tls_port(server)
        status, body, _, name, kept = https(port)
        self.addCleanup(kept.close)
        self.assertEqual((status, name), (200, "first"))
        first_pid = pid_in(body)
        self.assertIn("(generation 1)", body)
        fingerprint = write_certificate(self.cert, self.key, "second")  # renewed on disk
        result = reload(server)
        self.assertEqual(result.returncode, 0, result.stdout + server.output(40))
        # New connections: the new generation, the new certificate.
        status, body, _, name, fresh = https(port)
        fresh.close()
        self.assertEqual((status, name), (200, "second"))
        self.assertIn("(generation 2)", body)
        self.assertNotEqual(pid_in(body), first_pid)
        # The connection opened before: still answered, by the old generation
        # (which closes it after this response: it drains).
        status, body, connection, name, _ = https(port, connection=kept)
        self.assertEqual((status, name, pid_in(body), connection), (200, "first", first_pid,
                                                                      "close"))
        # /status says which certificate each process serves.
        certificates = [e.get("certificates", {}).get("https") for e in server.status().values()
                        if e.get("generation") == 2 and e.get("serving_since")
                        and e.get("role") != "master"]  # the master serves no TLS
        self.assertTrue(certificates)
        self.assertEqual({c["sha256"] for c in certificates}, {fingerprint})
        self.assertEqual({c["subject"] for c in certificates}, {"CN=second"})
        if self.workers == "0":  # a master's status lists its workers, not their certificates
            status = subprocess.run(
                [sys.executable, "-m", "twisted_graceful", "status", "--pidfile", server.pidfile],
                capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
            self.assertIn("https certificate: CN=second, expires ", status.stdout)
            self.assertIn(f"sha256 {fingerprint[:16]}...", status.stdout)

    def test_broken_certificate_fails_the_upgrade(self):
        server = self.start()
        port = self.tls_port(server)
        with open(self.cert, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
        result = reload(server)
        self.assertEqual(result.returncode, 1, result.stdout + server.output(40))
        self.assertIn("reload failed", result.stdout)
        self.assertIn("certKey=cert.pem is not a PEM certificate", result.stdout)
        # The old generation serves on, with the certificate it loaded.
        status, body, _, name, connection = https(port)
        connection.close()
        self.assertEqual((status, name), (200, "first"))
        self.assertIn("(generation 1)", body)

    def test_key_that_does_not_match_fails_the_upgrade(self):
        server = self.start()
        port = self.tls_port(server)
        other_key = os.path.join(self.cwd, "other-key.pem")
        write_certificate(os.path.join(self.cwd, "other-cert.pem"), other_key, "other")
        os.replace(other_key, self.key)  # a new key, the old certificate
        result = reload(server)
        self.assertEqual(result.returncode, 1, result.stdout + server.output(40))
        self.assertIn("the private key (privateKey=key.pem) does not match the certificate "
                      "(certKey=cert.pem)", result.stdout)
        status, body, _, name, connection = https(port)
        connection.close()
        self.assertEqual((status, name), (200, "first"))
        self.assertIn("(generation 1)", body)


class MasterTLSTests(TLSTestCase):
    """
    The same under a master (the default, one worker): the master binds the
    TCP socket and never loads a certificate; each worker set loads its own.
    """

    workers = "1"


class SocketActivationTests(unittest.TestCase):
    """
    C{--tls-port systemd:https:privateKey=...:certKey=...}: systemd passes a
    plain TCP socket (here C{systemd-socket-activate}, which starts the
    server on the first connection); the workers serve TLS on it.
    """

    def test_https_on_a_socket_from_systemd(self):
        if SOCKET_ACTIVATE is None:
            raise unittest.SkipTest("systemd-socket-activate is not installed")
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        write_certificate(os.path.join(cwd, "cert.pem"), os.path.join(cwd, "key.pem"), "sd")
        port = free_port()
        server = ServerProcess(self, [
            "graceful", "--port", "tcp:0:interface=127.0.0.1", "--slow-every", "0",
            "--tls-port", "systemd:https:privateKey=key.pem:certKey=cert.pem",
            "--db", os.path.join(cwd, "store.sqlite3")], cwd=cwd)
        command = [SOCKET_ACTIVATE, "--fdname=https", "-l", f"127.0.0.1:{port}"]
        for variable in ("PYTHONPATH", "PYTHONUNBUFFERED", "PATH", "HOME", MARKER_ENV):
            command += ["-E", f"{variable}={server.env.get(variable, '')}"]
        server.command = command + server.command
        server.start()
        wait_tcp_listening(port, server.proc.pid, server.output)
        # The first connection starts the server and waits in the queue.
        status, body, _, name, connection = https(port)
        connection.close()
        self.assertEqual((status, name), (200, "sd"))
        self.assertIn("(generation 1)", body)
        write_certificate(os.path.join(cwd, "cert.pem"), os.path.join(cwd, "key.pem"),
                          "sd-renewed")
        result = reload(server)
        self.assertEqual(result.returncode, 0, result.stdout + server.output(40))
        status, body, _, name, connection = https(port)
        connection.close()
        self.assertEqual((status, name), (200, "sd-renewed"))
        self.assertIn("(generation 2)", body)


class StartTests(ClearErrorMixin, unittest.TestCase):
    def run_twistd(self, tls_port, *extra):
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        write_certificate(os.path.join(cwd, "cert.pem"), os.path.join(cwd, "key.pem"), "a")
        write_certificate(os.path.join(cwd, "b-cert.pem"), os.path.join(cwd, "b-key.pem"), "b")
        return subprocess.run(
            [sys.executable, TWISTD, "--nodaemon", "--pidfile", os.path.join(cwd, "t.pid"),
             "graceful", "--db", os.path.join(cwd, "db.sqlite3"),
             "--port", "tcp:0:interface=127.0.0.1", "--txn-port", "tcp:0:interface=127.0.0.1",
             "--metrics-port", "tcp:0:interface=127.0.0.1", "--tls-port", tls_port, *extra],
            cwd=cwd, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
            timeout=60)

    def test_key_that_does_not_match_is_refused(self):
        for workers in ("0", "1"):
            self.assertClearError(
                self.run_twistd("ssl:0:privateKey=b-key.pem:certKey=cert.pem", "--workers",
                                workers),
                "--tls-port ssl:0:privateKey=b-key.pem:certKey=cert.pem: the private key "
                "(privateKey=b-key.pem) does not match the certificate (certKey=cert.pem)")

    def test_missing_files(self):
        self.assertClearError(self.run_twistd("ssl:0:privateKey=key.pem:certKey=nowhere.pem"),
                              "cannot read the certificate (certKey=nowhere.pem): No such file")
        # Twisted's default: privateKey=server.pem, and the certificate in it too.
        self.assertClearError(self.run_twistd("ssl:0"),
                              "cannot read the certificate (certKey=server.pem)")

    def test_not_a_tls_description(self):
        self.assertClearError(self.run_twistd("tcp:8443"),
                              "--tls-port 'tcp:8443': unsupported listener type 'tcp'",
                              "ssl:PORT:privateKey=")
        self.assertClearError(self.run_twistd("ssl:0:privateKey=key.pem:colour=blue"),
                              "unknown parameter(s) colour")
