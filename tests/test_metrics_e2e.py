"""
End to end: metrics, C{/status}, the status file and the reload command
against real C{twistd} processes on ephemeral loopback ports.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import formatEvent
from twisted.trial import unittest

from tests.e2e import REPO, TWISTD, ServerProcess, TacApp, http_get, pid_in

LOOPBACK = "tcp:0:interface=127.0.0.1"


def scrape(port):
    """
    {(sample name, frozenset of label items): value} from C{/metrics}.
    """
    status, body, _ = http_get(port, "/metrics")
    assert status == 200, (status, body)
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(port, name, **labels):
    return scrape(port).get((name, frozenset(labels.items())))


def wait_metric(port, name, expected, timeout=20, **labels):
    """
    Scrape until C{name{labels}} equals C{expected} (a bounded loop over
    real scrapes: the metric is what we wait on).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = metric(port, name, **labels)
        if value == expected:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} is {value}, not {expected}, after {timeout} s")
        time.sleep(0.02)


def get_status(port):
    status, body, _ = http_get(port, "/status")
    assert status == 200, (status, body)
    return json.loads(body)


def run_command(*args, timeout=90):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO
    return subprocess.run([sys.executable, "-m", "twisted_graceful"] + list(args),
                          capture_output=True, text=True, env=env, timeout=timeout)


def reload(server, timeout=30):
    return run_command("reload", "--pidfile", server.pidfile, "--timeout", str(timeout),
                       timeout=timeout + 60)


class PluginMetricsTests(unittest.TestCase):
    def start(self, *extra):
        server = ServerProcess(
            self, ["graceful", "--port", LOOPBACK, "--metrics-port", LOOPBACK, "--slow-every",
                   "0", "--db", os.path.join(os.path.abspath(self.mktemp()) + ".sqlite3")]
            + list(extra)).start()
        pid, ports = server.wait_listening()
        server.wait_ready(1)
        return server, pid, ports

    def test_connections_requests_and_upgrades(self):
        server, pid, ports = self.start()
        m = ports["metrics"]
        self.assertEqual(metric(m, "graceful_generation"), 1)
        self.assertEqual(metric(m, "graceful_open_connections", protocol="http"), 0)
        before = metric(m, "graceful_requests_total", protocol="http", result="2xx")

        # A keep-alive connection stays open after its answer.
        conn = socket.create_connection(("127.0.0.1", ports["http"]), timeout=10)
        self.addCleanup(conn.close)
        conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertIn(b"hello world", conn.recv(65536))
        self.assertEqual(metric(m, "graceful_open_connections", protocol="http"), 1)
        self.assertEqual(metric(m, "graceful_inflight_transactions", protocol="http"), 0)
        self.assertEqual(metric(m, "graceful_requests_total", protocol="http", result="2xx"),
                         before + 1)
        http_get(ports["http"], "/nothing-here")
        self.assertEqual(metric(m, "graceful_requests_total", protocol="http", result="4xx"), 1)

        # A slow request is a transaction in flight.
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault(
            "r", http_get(ports["http"], "/slow?seconds=4", timeout=30)))
        thread.start()
        server.wait_inflight(pid)
        self.assertEqual(metric(m, "graceful_inflight_transactions", protocol="http"), 1)
        self.assertEqual(metric(m, "graceful_open_connections", protocol="http"), 2)
        thread.join(30)
        self.assertEqual(result["r"][0], 200)
        conn.close()
        wait_metric(m, "graceful_open_connections", 0, protocol="http")
        wait_metric(m, "graceful_inflight_transactions", 0, protocol="http")

        # A transaction on the txn port, committed.
        with socket.create_connection(("127.0.0.1", ports["txn"]), timeout=10) as txn:
            reader = txn.makefile("rb")
            reader.readline()
            self.assertEqual(metric(m, "graceful_open_connections", protocol="txn"), 1)
            txn.sendall(b"BEGIN\r\nSET k 1\r\nCOMMIT\r\n")
            for _ in range(3):
                reply = reader.readline()
            self.assertIn(b"committed", reply)
        self.assertEqual(
            metric(m, "graceful_requests_total", protocol="txn", result="committed"), 1)

        # A good upgrade through the reload command.
        done = reload(server)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        new = server.read_pidfile()
        self.assertNotEqual(new, pid)
        self.assertIn(f"reloaded: pid {new} (generation 2) serves", done.stdout)
        self.assertEqual(len(done.stdout.splitlines()), 1)
        samples = scrape(m)
        self.assertEqual(samples[("graceful_generation", frozenset())], 2)
        self.assertEqual(samples[("graceful_reloads_total", frozenset({("result", "ok")}))], 1)
        # Counters are per process: the new generation starts from zero.
        self.assertEqual(
            samples[("graceful_requests_total",
                     frozenset({("protocol", "txn"), ("result", "committed")}))], 0)
        status = get_status(m)
        self.assertEqual((status["pid"], status["generation"], status["state"]),
                         (new, 2, "serving"))
        self.assertEqual(status["parent_pid"], pid)
        # The old generation's drain is counted by its successor.
        server.wait_exit_line(pid)
        wait_metric(m, "graceful_drain_duration_seconds_count", 1)
        self.assertEqual(metric(m, "graceful_upgrade_duration_seconds_count"), 1)
        server.signal(new, signal.SIGTERM)
        server.wait_all_exited()

    def test_metrics_port_answers_across_upgrades(self):
        server, pid, ports = self.start()
        m = ports["metrics"]
        answers = []
        stop = threading.Event()

        def scraper():
            deadline = time.monotonic() + 120
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    answers.append(("ok", metric(m, "graceful_generation")))
                except Exception as e:  # refused or reset: a failure
                    answers.append((repr(e), None))

        thread = threading.Thread(target=scraper)
        thread.start()
        try:
            for generation in (2, 3, 4):
                start = len(answers)
                while len(answers) < start + 5 and thread.is_alive():
                    time.sleep(0.01)
                done = reload(server)
                self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
                self.assertIn(f"(generation {generation}) serves", done.stdout)
        finally:
            stop.set()
            thread.join(30)
        self.assertEqual([a for a in answers if a[0] != "ok"], [])
        self.assertEqual({g for _, g in answers}, {1, 2, 3, 4})
        self.assertEqual(metric(m, "graceful_reloads_total", result="ok"), 3)
        out = run_command("status", "--pidfile", server.pidfile)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("generation 4: serving", out.stdout)
        server.signal(server.read_pidfile(), signal.SIGTERM)
        server.wait_all_exited()

    def test_json_logs_across_generations(self):
        server = ServerProcess(
            self, ["graceful", "--port", LOOPBACK, "--slow-every", "0", "--log-format", "json",
                   "--db", os.path.abspath(self.mktemp()) + ".sqlite3"]).start()
        pid, ports = server.wait_listening()
        http_port = ports["http"]
        self.assertEqual(http_get(http_port)[0], 200)
        server.signal(pid, signal.SIGHUP)
        new = server.wait_handover(1)
        self.assertEqual(server.wait_ready(2), new)
        server.wait_exit_line(pid)
        self.assertEqual(pid_in(http_get(http_port)[1]), new)
        server.signal(new, signal.SIGTERM)
        server.wait_all_exited()
        # Every process is gone: we have read every line it wrote.
        with server._cond:
            lines = [line for line in server.lines if line.strip()]
        events = [json.loads(line) for line in lines]  # nothing but JSON, from every generation

        def event(text):
            for e in events:
                if text in formatEvent(e):
                    return e
            self.fail(f"no event reads {text!r}; events:\n"
                      + "\n".join(formatEvent(e) for e in events[-40:]))

        listening = event("generation 1: listening on http=")
        self.assertEqual((listening["pid"], listening["gen"]), (pid, 1))
        listed = dict(item.split("=") for item in listening["listeners"].split(", "))
        self.assertEqual(int(listed["http"].rsplit(":", 1)[1]), http_port)
        event(f"pid {pid} generation 1: serving")
        self.assertEqual(event("generation 1: stopped accepting")["child"], new)
        event(f"pid {new} generation 2: inherited http=")
        event(f"pid {new} generation 2: ready after")
        event(f"pid {pid} generation 1: drained")
        event(f"pid {new} generation 2: shutting down")

    def test_bad_log_format(self):
        result = subprocess.run(
            [sys.executable, TWISTD, "--nodaemon", "--pidfile",
             os.path.abspath(self.mktemp()), "graceful", "--log-format", "xml"],
            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--log-format must be one of text, json", result.stdout + result.stderr)


class TacMetricsTests(unittest.TestCase):
    """
    Broken and never-ready upgrades of a .tac application using the library.
    """

    def deploy(self, fault="", readiness=""):
        self.app.deploy(fault, readiness)

    # Long enough that, after a reload command gave up at 1 s, the upgrade
    # still runs while we look at it (two scrapes and another command, on a
    # loaded machine).
    READY_TIMEOUT = 10

    def setUp(self):
        self.app = TacApp(self, with_metrics=True, ready_timeout=self.READY_TIMEOUT)
        self.server, self.pid, self.ports = self.app.start()
        self.m = self.ports["metrics"]

    def assertStillServing(self):
        status, body, _ = http_get(self.ports["http"])
        self.assertEqual((status, pid_in(body)), (200, self.pid))
        self.assertEqual(self.server.read_pidfile(), self.pid)
        self.assertEqual(get_status(self.m)["state"], "serving")

    def good_reload(self, generation=2):
        self.deploy()
        done = reload(self.server)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        new = self.server.read_pidfile()
        self.assertIn(f"reloaded: pid {new} (generation {generation}) serves", done.stdout)
        self.assertEqual(pid_in(http_get(self.ports["http"])[1]), new)
        self.assertEqual(metric(self.m, "graceful_generation"), generation)
        self.server.signal(new, signal.SIGTERM)
        self.server.wait_all_exited()

    def test_broken_upgrade(self):
        self.deploy(fault='raise RuntimeError("broken deploy: DATABASE_URL is not set")')
        done = reload(self.server)
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        self.assertIn("reload failed (failed)", done.stdout)
        self.assertIn("exited with status 1 before it was ready", done.stdout)
        self.assertIn("broken deploy: DATABASE_URL is not set", done.stdout)
        self.assertIn(f"pid {self.pid} keeps serving", done.stdout)
        self.assertStillServing()
        self.assertEqual(metric(self.m, "graceful_reloads_total", result="failed"), 1)
        self.assertEqual(metric(self.m, "graceful_reloads_total", result="ok"), 0)
        last = get_status(self.m)["last_upgrade"]
        self.assertEqual(last["result"], "failed")
        self.assertIn("exited with status 1", last["error"])
        self.assertTrue(any("DATABASE_URL" in line for line in last["output_tail"]))
        # The same in the status file, without the metrics port.
        out = run_command("status", "--pidfile", self.app.pidfile)
        self.assertEqual(out.returncode, 0)
        self.assertIn("last upgrade failed", out.stdout)
        self.good_reload()

    def test_never_ready_upgrade(self):
        self.deploy(readiness="graceful.add_readiness_check(lambda: defer.Deferred())")
        # Shorter than the ready timeout: the command gives up first.
        done = reload(self.server, timeout=1)
        self.assertEqual(done.returncode, 4, done.stdout + done.stderr)
        self.assertIn("reload timed out after 1 s", done.stdout)
        self.assertIn("still upgrading", done.stdout)
        # Held not ready: /status says so, with the child being started.
        status = get_status(self.m)
        self.assertEqual((status["pid"], status["state"]), (self.pid, "upgrading"))
        child = status["child"]["pid"]
        self.assertIsInstance(child, int)
        self.assertNotEqual(child, self.pid)
        self.assertEqual(metric(self.m, "graceful_state", state="upgrading"), 1)
        out = run_command("status", "--pidfile", self.app.pidfile)
        self.assertIn(f"upgrading to pid {child}", out.stdout)
        last = self.server.wait_upgrade_outcome(self.pid)
        self.assertEqual((last["result"], last["child_pid"]), ("timeout", child))
        self.server.assert_output(
            rf"Upgrade failed: pid {child} was not ready within {self.READY_TIMEOUT}(\.0)? s")
        self.assertStillServing()
        self.assertEqual(metric(self.m, "graceful_reloads_total", result="timeout"), 1)
        last = get_status(self.m)["last_upgrade"]
        self.assertEqual((last["result"], last["child_pid"]), ("timeout", child))
        # Longer than the ready timeout: the command reports the failure.
        done = reload(self.server, timeout=30)
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        self.assertIn("reload failed (timeout)", done.stdout)
        self.assertIn(f"was not ready within {self.READY_TIMEOUT}", done.stdout)
        self.assertEqual(metric(self.m, "graceful_reloads_total", result="timeout"), 2)
        self.good_reload()
