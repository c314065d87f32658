"""
One view of the whole server, with real processes: C{twistd graceful
--workers 2}, whose every worker answers C{/metrics} with the sum over every
worker, old and new, and the master's own counts. Synchronised on the
status file, the processes alive and the metrics themselves.
"""

import os
import signal
import socket
import time

from tests.e2e import http_get, pid_in
from tests.test_master_e2e import ABORT_GRACE, DRAIN_TIMEOUT, SLACK, WORKERS, MasterTestCase
from tests.test_metrics_e2e import metric, wait_metric

REQUESTS = "graceful_requests_total"


def serving(entry, generation):
    """
    The workers of C{generation} that serve, in the master's status entry
    (which may still list a worker that has just exited as draining).
    """
    return {w["pid"] for w in entry["workers"]
            if w["generation"] == generation and w["state"] == "serving"}


def environ_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = f.read().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in items if b"=" in item)


class Client:
    """
    Requests on fresh connections, and scrapes: every answer counted, every
    scraped total kept in order.
    """

    def __init__(self, testcase, ports):
        self.testcase = testcase
        self.ports = ports
        self.made = 0
        self.totals = []

    def get(self):
        status, body, _ = http_get(self.ports["http"])
        self.testcase.assertEqual(status, 200, body)
        self.made += 1
        return pid_in(body)

    def until_answered_by(self, pids, at_least=20, most=2000):
        """
        Requests until every one of C{pids} answered one (the workers share
        one accept queue: who accepts is the kernel's choice).
        """
        answered = set()
        for _ in range(most):
            answered.add(self.get())
            if answered >= set(pids) and self.made >= at_least:
                break
        self.testcase.assertTrue(set(pids) <= answered, (pids, answered))
        return answered

    def total(self):
        """
        One scrape (whichever worker answers): the HTTP requests counted.
        """
        value = metric(self.ports["metrics"], REQUESTS, protocol="http", result="2xx")
        self.totals.append(value)
        return value

    def assert_counted(self):
        """
        The total equals what we made, and no scrape ever saw it go down.
        """
        self.testcase.assertEqual(self.total(), self.made)
        self.testcase.assertEqual(self.totals, sorted(self.totals), "a counter went down")


class OneViewTests(MasterTestCase):
    def test_counters_continue_across_an_upgrade_and_gauges_sum_the_workers(self):
        server, master, ports = self.start()
        m = ports["metrics"]
        first = self.wait_master(server, master, 1)
        old = serving(first, 1)
        directory = environ_of(min(old))["PROMETHEUS_MULTIPROC_DIR"]
        client = Client(self, ports)
        self.assertEqual(client.total(), 0)  # the workers' self-tests are not requests
        client.until_answered_by(old)
        for _ in range(6):  # each scrape reaches one worker or the other: all see every request
            client.assert_counted()

        # Keep-alive connections held open on both workers: the gauge is their sum.
        held, holders = [], set()
        while holders != old or len(held) < 4:
            self.assertLess(len(held), 64, holders)
            conn = socket.create_connection(("127.0.0.1", ports["http"]), timeout=10)
            self.addCleanup(conn.close)
            conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = conn.recv(65536)
            self.assertIn(b"hello world", answer)
            client.made += 1
            holders.add(pid_in(answer.decode()))
            held.append(conn)
        wait_metric(m, "graceful_open_connections", len(held), protocol="http")
        client.assert_counted()

        # A blue-green upgrade: the old workers drain, new ones serve.
        self.assertEqual(server.request_upgrade(master), "started")
        for _ in range(10):
            client.get()
            client.total()  # while the sets overlap: never down
        for conn in held:
            conn.close()
        second = self.wait_master(server, master, 2)
        new = serving(second, 2)
        self.assertFalse(new & old)
        self.assertEqual(server.live_processes() - {master}, new)  # the old ones are gone
        client.assert_counted()
        client.until_answered_by(new)
        for _ in range(6):
            client.assert_counted()
        wait_metric(m, "graceful_open_connections", 0, protocol="http")

        # The master's counts and every worker's drain, in the same view.
        self.assertEqual(metric(m, "graceful_reloads_total", result="ok"), 1)
        self.assertEqual(metric(m, "graceful_upgrade_duration_seconds_count"), 1)
        self.assertEqual(metric(m, "graceful_generation"), 2)
        self.assertEqual(metric(m, "graceful_state", state="serving"), 1)
        self.assertEqual(metric(m, "graceful_drain_duration_seconds_count"), WORKERS)

        server.signal(master, signal.SIGTERM)
        server.assert_all_gone_within(DRAIN_TIMEOUT + ABORT_GRACE + SLACK)
        self.assertFalse(os.path.exists(directory), "the master left its metrics directory")

    def test_a_killed_worker_loses_no_count(self):
        server, master, ports = self.start()
        old = serving(self.wait_master(server, master, 1), 1)
        client = Client(self, ports)
        client.until_answered_by(old)
        client.assert_counted()
        conn = socket.create_connection(("127.0.0.1", ports["http"]), timeout=10)
        self.addCleanup(conn.close)
        conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        victim = pid_in(conn.recv(65536).decode())
        client.made += 1
        wait_metric(ports["metrics"], "graceful_open_connections", 1, protocol="http")
        server.signal(victim, signal.SIGKILL)
        server.wait_gone(victim)
        deadline = time.monotonic() + 30
        while True:
            entry = server.status().get(master, {})
            now = serving(entry, 1) if entry.get("workers") else set()
            if len(now) == WORKERS and victim not in now:
                break
            self.assertLess(time.monotonic(), deadline, entry)
            time.sleep(0.05)  # the status file is written by another process
        # What the killed worker counted is still there; its connection is not.
        client.assert_counted()
        wait_metric(ports["metrics"], "graceful_open_connections", 0, protocol="http")
        self.assertEqual(metric(ports["metrics"], "graceful_worker_restarts_total"), 1)
        client.until_answered_by(now)
        client.assert_counted()

    def test_the_view_survives_the_master_reexecuting_itself(self):
        server, master, ports = self.start()
        old = serving(self.wait_master(server, master, 1), 1)
        directory = environ_of(min(old))["PROMETHEUS_MULTIPROC_DIR"]
        client = Client(self, ports)
        client.until_answered_by(old)
        self.assertEqual(server.request_upgrade(master), "started")
        self.wait_master(server, master, 2)
        client.assert_counted()
        # SIGUSR2: same PID, same workers (then upgraded), same directory.
        server.signal(master, signal.SIGUSR2)
        entry = self.wait_master(server, master, 3)
        self.assertEqual(entry["execs"], 1)
        newest = serving(entry, 3)
        self.assertEqual(environ_of(min(newest))["PROMETHEUS_MULTIPROC_DIR"], directory)
        client.assert_counted()
        client.until_answered_by(newest)
        client.assert_counted()
        # The upgrade before and the one after the re-exec, counted by either image.
        self.assertEqual(metric(ports["metrics"], "graceful_reloads_total", result="ok"), 2)
        self.assertEqual(metric(ports["metrics"], "graceful_generation"), 3)
        server.signal(master, signal.SIGTERM)
        server.assert_all_gone_within(DRAIN_TIMEOUT + ABORT_GRACE + SLACK)
        self.assertFalse(os.path.exists(directory))
