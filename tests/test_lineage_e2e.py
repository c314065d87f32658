"""
No old code keeps running after an upgrade, whatever the timing: upgrades
while an older generation still drains (a slow request, an open
transaction), three in a row, and SIGTERM afterwards. Real twistd processes;
the tests synchronise on the status file, the pidfile and the processes
alive, and check which process answers fresh connections.
"""

import os
import signal
import socket
import subprocess
import sys
import threading

from twisted.trial import unittest

from tests.e2e import REPO, START_UP, ServerProcess, http_get, pid_in

DRAIN_TIMEOUT = 20
ABORT_GRACE = 2
SLACK = 15  # a loaded 2-core machine: python start-up, reaping


def ports_of(entry):
    """
    listener name -> port, from a status entry's listener descriptions.
    """
    return {name: int(where.rsplit(":", 1)[1]) for name, where in entry["listeners"].items()}


class LineageTestCase(unittest.TestCase):
    def start(self):
        server = ServerProcess(self, [
            "graceful", "--port", "tcp:0:interface=127.0.0.1", "--slow-every", "0",
            "--db", os.path.abspath(self.mktemp()) + ".sqlite3",
            "--drain-timeout", str(DRAIN_TIMEOUT), "--abort-grace", str(ABORT_GRACE),
            "--ready-timeout", "20",
        ]).start()
        current, _, entries = server.wait_settled(serving=True)
        return server, current, ports_of(entries[current])

    def upgrade(self, server, current):
        """
        SIGHUP to the pidfile's pid, and wait until its successor serves.
        """
        server.signal(current, signal.SIGHUP)
        new, live, entries = server.wait_settled(changed_from=current)
        self.assertEqual(entries[new]["generation"], entries[current]["generation"] + 1)
        self.assertEqual(entries[new]["state"], "serving")
        return new

    def cli(self, server, *args):
        return subprocess.run(
            [sys.executable, "-m", "twisted_graceful", *args, "--pidfile", server.pidfile],
            capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))

    def stop(self, server, current):
        server.signal(current, signal.SIGTERM)
        server.assert_all_gone_within(DRAIN_TIMEOUT + ABORT_GRACE + SLACK)
        self.assertFalse(os.path.exists(server.pidfile))


class UpgradesWhileDrainingTests(LineageTestCase):
    def test_second_upgrade_while_the_first_generation_drains(self):
        """
        The issue's reproduction: a slow request holds generation 1; HUP,
        HUP. Generation 2 hands over to 3 and exits; generation 1 must not
        take that for a death and serve again.
        """
        server, first, ports = self.start()
        result = {}
        slow = threading.Thread(target=lambda: result.setdefault(
            "r", http_get(ports["http"], f"/slow?seconds={4 + 2 * START_UP}", timeout=60)))
        slow.start()
        server.wait_inflight(first)
        second = self.upgrade(server, first)
        third = self.upgrade(server, second)
        server.wait_gone(second)
        server.assert_only_current_accepts(ports["http"], third)
        self.assertIn(first, server.live_processes())  # still draining the slow request
        slow.join(60)
        self.assertEqual((result["r"][0], pid_in(result["r"][1])), (200, first))
        server.wait_gone(first)
        server.assert_only_current_accepts(ports["http"], third)
        entries = server.status()
        self.assertEqual(entries[first]["last_upgrade"]["result"], "ok")
        self.assertIsNone(entries[first]["took_back_from"])
        status = self.cli(server, "status")
        self.assertIn(f"pid {third} generation 3: serving", status.stdout)
        self.stop(server, third)

    def test_open_transaction_on_the_first_generation(self):
        server, first, ports = self.start()
        txn = socket.create_connection(("127.0.0.1", ports["txn"]), timeout=60)
        self.addCleanup(txn.close)
        reader = txn.makefile("rb")
        self.assertIn(f"pid {first} generation 1".encode(), reader.readline())
        txn.sendall(b"BEGIN\r\nSET apples 3\r\n")
        self.assertEqual(reader.readline(), b"250 begin\r\n")
        self.assertEqual(reader.readline(), b"250 queued\r\n")
        second = self.upgrade(server, first)
        third = self.upgrade(server, second)
        server.wait_gone(second)
        server.assert_only_current_accepts(ports["http"], third)
        txn.sendall(b"COMMIT\r\n")
        self.assertRegex(reader.readline(), rb"^250 committed txid=\d+ apples=3\r\n$")
        self.assertRegex(reader.readline(), rb"^421 ")
        server.wait_gone(first)
        server.assert_only_current_accepts(ports["http"], third)
        self.assertEqual(http_get(ports["http"], "/kv/apples")[1].strip(), "3")
        self.stop(server, third)

    def test_three_upgrades_while_the_first_generation_drains_then_sigterm(self):
        """
        SIGTERM to the pidfile's pid ends every process of the server, the
        first generation (still draining) included.
        """
        server, first, ports = self.start()
        slow = threading.Thread(target=lambda: http_get(
            ports["http"], f"/slow?seconds={4 + 4 * START_UP}", timeout=60))
        slow.start()
        self.addCleanup(slow.join, 60)
        server.wait_inflight(first)
        current = first
        for _ in range(3):
            current = self.upgrade(server, current)
        self.assertEqual(server.status()[current]["generation"], 4)
        server.assert_only_current_accepts(ports["http"], current)
        self.assertIn(first, server.live_processes())
        reload = self.cli(server, "reload", "--timeout", "60")
        self.assertEqual(reload.returncode, 0, reload.stdout + reload.stderr)
        newest, _, entries = server.wait_settled()
        self.assertIn(f"reloaded: pid {newest} (generation 5)", reload.stdout)
        server.assert_only_current_accepts(ports["http"], newest)
        self.stop(server, newest)
