"""
C{--access-log PATH|-|none}: twisted.web's combined log format, written in
batches through a buffer, to a file every generation appends to, or nowhere;
the metrics count the requests either way.
"""

import os
import re
import signal

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial import unittest

from twisted_graceful import tap
from twisted_graceful.access_log import (
    FLUSH_SECONDS,
    MAX_BUFFERED,
    BufferedAccessLog,
    check_access_log,
    open_access_log,
)
from twisted_graceful.http import GracefulSite

from tests.e2e import ServerProcess, http_get, metric_value
from tests.test_metrics import MetricsTestCase, Page, emit

# twisted.web's combinedLogFormatter: the client's address is quoted.
COMBINED = re.compile(r'^"[0-9.]+" - - \[[^]]+\] "GET (\S+) HTTP/1\.1" (\d{3}) \d+ "-" "[^"]*"$')


class Target:
    def __init__(self):
        self.writes = []

    def write(self, data):
        self.writes.append(data)

    def flush(self):
        pass


def get(site, *paths):
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = StringTransport()
    channel.makeConnection(transport)
    for path in paths:
        channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    channel.connectionLost(None)
    return transport.value()


class BufferTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.target = Target()
        self.log = BufferedAccessLog(self.target, self.clock)
        self.log.start()
        self.addCleanup(self.log.stop)

    def test_lines_are_written_together_once_a_second(self):
        self.log.write("one\n")
        self.log.write("two\n")
        self.assertEqual(self.target.writes, [])
        self.clock.advance(FLUSH_SECONDS)
        self.assertEqual(self.target.writes, [b"one\ntwo\n"])
        self.clock.advance(FLUSH_SECONDS)
        self.assertEqual(len(self.target.writes), 1, "nothing new: nothing written")

    def test_a_full_buffer_is_written_at_once(self):
        line = "x" * 999 + "\n"
        for _ in range(MAX_BUFFERED // len(line) + 1):
            self.log.write(line)
        self.assertEqual(len(self.target.writes), 1)
        self.assertTrue(len(self.target.writes[0]) >= MAX_BUFFERED)

    def test_stop_writes_what_is_left(self):
        self.log.write("last\n")
        self.log.stop()
        self.assertEqual(self.target.writes, [b"last\n"])


class SiteTests(MetricsTestCase):
    def site(self, access_log):
        clock = Clock()
        log = None if access_log is None else BufferedAccessLog(access_log, clock)
        site = GracefulSite(Page(), drain_tracker=self.graceful.tracker, reactor=clock,
                            access_log=log)
        self.metrics.observe_http_site(site)
        emit(self.graceful, "serving", source="bound")
        site.startFactory()
        self.addCleanup(site.stopFactory)
        return site, clock

    def test_combined_log_format_through_the_buffer(self):
        target = Target()
        site, clock = self.site(target)
        get(site, b"/", b"/missing")
        self.assertEqual(target.writes, [])
        clock.advance(FLUSH_SECONDS)
        lines = b"".join(target.writes).decode().splitlines()
        self.assertEqual([COMBINED.match(line).groups() for line in lines],
                         [("/", "200"), ("/missing", "404")], lines)
        self.assertEqual(self.value("graceful_requests_total", protocol="http", result="2xx"), 1)

    def test_none_writes_nothing_and_the_metrics_still_count(self):
        site, clock = self.site(None)
        self.assertIn(b"200", get(site, b"/", b"/missing"))
        clock.advance(FLUSH_SECONDS)
        self.assertEqual(self.value("graceful_requests_total", protocol="http", result="2xx"), 1)
        self.assertEqual(self.value("graceful_requests_total", protocol="http", result="4xx"), 1)


class OptionTests(unittest.TestCase):
    def test_default_is_none(self):
        self.assertEqual(tap.Options()["access-log"], "none")

    def test_stdout_none_and_a_file_are_accepted(self):
        path = os.path.abspath(self.mktemp())
        for spec in ("-", "none", path):
            self.assertIsNone(check_access_log(spec), spec)

    def test_missing_directory_is_one_clear_line(self):
        problem = check_access_log("/nonexistent-dir/access.log")
        self.assertIn("/nonexistent-dir", problem)
        self.assertIn("does not exist", problem)
        self.assertNotIn("\n", problem)

    def test_a_directory_is_refused(self):
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        self.assertIn("is a directory", check_access_log(path))

    def test_usage_error_from_the_options(self):
        options = tap.Options()
        options.preflight = True  # bind nothing
        error = self.assertRaises(
            usage.UsageError, options.parseOptions,
            ["--access-log", "/nonexistent-dir/a.log", "--db", os.path.abspath(self.mktemp())])
        self.assertIn("--access-log /nonexistent-dir/a.log", str(error))

    def test_a_file_appends_across_opens(self):
        path = os.path.abspath(self.mktemp())
        for line in ("first\n", "second\n"):
            log = open_access_log(path, Clock())
            log.write(line)
            log.stop()
            log.target.close()
        with open(path) as f:
            self.assertEqual(f.read(), "first\nsecond\n")


class EndToEndTests(unittest.TestCase):
    def start(self, *extra):
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)
        server = ServerProcess(self, [
            "graceful", "--port", "tcp:0:interface=127.0.0.1", "--slow-every", "0",
            "--db", os.path.join(self.cwd, "store.sqlite3"), *extra], cwd=self.cwd).start()
        return server

    def test_every_generation_appends_to_one_access_log(self):
        server = self.start("--access-log", "access.log")
        path = os.path.join(self.cwd, "access.log")
        first, ports = server.wait_listening(1)
        for _ in range(3):
            self.assertEqual(http_get(ports["http"])[0], 200)
        server.signal(first, signal.SIGHUP)
        second = server.wait_handover(1)
        server.wait_listening(2)
        for _ in range(2):
            self.assertEqual(http_get(ports["http"], "/missing")[0], 404)
        server.signal(second, signal.SIGTERM)
        server.wait_all_exited()
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual([COMBINED.match(line).groups() for line in lines],
                         [("/", "200")] * 3 + [("/missing", "404")] * 2, lines)

    def test_none_by_default_and_the_metrics_count(self):
        server = self.start()
        pid, ports = server.wait_listening(1)
        for _ in range(3):
            self.assertEqual(http_get(ports["http"], "/?probe=access-log")[0], 200)
        status, text, _ = http_get(ports["metrics"], "/metrics")
        self.assertEqual(metric_value(text, "graceful_requests_total", protocol="http",
                                      result="2xx"), 3)
        server.signal(pid, signal.SIGTERM)
        server.wait_all_exited()
        self.assertNotIn("probe=access-log", server.output(last=10 ** 6))
        self.assertEqual(os.listdir(self.cwd).count("access.log"), 0)

    def test_sigusr1_rotates_it(self):
        server = self.start("--access-log", "access.log")
        path = os.path.join(self.cwd, "access.log")
        pid, ports = server.wait_listening(1)
        self.assertEqual(http_get(ports["http"], "/?before")[0], 200)
        server.signal(pid, signal.SIGUSR1)
        server.wait_path(path + ".1")
        self.assertEqual(http_get(ports["http"], "/?after")[0], 200)
        server.signal(pid, signal.SIGTERM)
        server.wait_all_exited()
        with open(path + ".1") as f:
            self.assertIn("/?before", f.read())
        with open(path) as f:
            rotated = f.read()
        self.assertIn("/?after", rotated)
        self.assertNotIn("/?before", rotated)

    def test_workers_of_a_master_append_to_one_file(self):
        server = self.start("--access-log", "access.log", "--workers", "1")
        path = os.path.join(self.cwd, "access.log")
        master = server.wait_pidfile()
        _, ports = server.wait_listening(1)
        self.assertEqual(http_get(ports["http"], "/?one")[0], 200)
        server.signal(master, signal.SIGHUP)
        server.wait_listening(2)  # a new worker: another process writing the file
        self.assertEqual(http_get(ports["http"], "/?two")[0], 200)
        server.signal(master, signal.SIGTERM)
        server.wait_all_exited()
        with open(path) as f:
            paths = [COMBINED.match(line).group(1) for line in f.read().splitlines()]
        self.assertEqual(paths, ["/?one", "/?two"])
