"""
End to end: draining HTTP across real upgrades, at transaction and at
connection level.
"""

import http.client
import signal
import socket
import threading
import time

from twisted.trial import unittest

from tests.e2e import ServerProcess, http_get, pid_alive, pid_in

LOOPBACK = "tcp:0:interface=127.0.0.1"


def start(testcase, *extra):
    server = ServerProcess(
        testcase, ["graceful", "--port", LOOPBACK, "--slow-every", "0"] + list(extra)).start()
    pid, ports = server.wait_listening()
    server.wait_ready(1)
    return server, pid, ports["http"]


def read_response(sock_file):
    """
    Read one HTTP/1.1 response with a Content-Length from a socket file;
    return (status, headers, body) or None at EOF.
    """
    status_line = sock_file.readline()
    if not status_line:
        return None
    headers = {}
    while True:
        line = sock_file.readline().decode("latin-1").strip()
        if not line:
            break
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = sock_file.read(int(headers.get("content-length", 0)))
    return int(status_line.split()[1]), headers, body.decode()


class KeepAliveDrainTests(unittest.TestCase):
    def test_keep_alive_clients_see_no_error_across_upgrades(self):
        """
        Keep-alive clients in a loop across 3 upgrades: no reset, no lost
        response; each is told Connection: close by a draining process and
        reconnects.
        """
        server, pid, port = start(self)
        errors, answered, pids = [], [0], set()
        stop = threading.Event()

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            deadline = time.monotonic() + 90
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    conn.request("GET", "/")
                    response = conn.getresponse()
                    body = response.read().decode()
                    if response.status != 200:
                        errors.append(response.status)
                    pids.add(pid_in(body))
                    answered[0] += 1
                except Exception as e:
                    errors.append(repr(e))
                    conn.close()
            conn.close()

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        current = pid
        for generation in (1, 2, 3):
            before = answered[0]
            while answered[0] < before + 50:
                time.sleep(0.01)
            server.signal(current, signal.SIGHUP)
            previous, current = current, server.wait_handover(generation)
            server.wait_exit_line(previous)
        before = answered[0]
        while answered[0] < before + 50:
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(30)
        self.assertEqual(errors, [])
        self.assertGreaterEqual(len(pids), 4)
        server.signal(current, signal.SIGTERM)
        server.wait_all_exited()

    def test_pipelined_requests_after_the_boundary_are_left_for_the_client_to_resend(self):
        server, pid, port = start(self)
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.addCleanup(sock.close)
        f = sock.makefile("rb")
        # Slow enough to be in flight until the next generation took over,
        # on a loaded machine too.
        sock.sendall(b"GET /slow?seconds=5 HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        server.wait_inflight(pid)
        server.signal(pid, signal.SIGHUP)
        new = server.wait_handover(1)
        status, headers, body = read_response(f)
        self.assertEqual((status, pid_in(body)), (200, pid))
        self.assertEqual(headers.get("connection"), "close")
        # Then an orderly end of stream, not a reset, and nothing else.
        self.assertEqual(f.read(), b"")
        status, body, _ = http_get(port)
        self.assertEqual(pid_in(body), new)

    def test_healthz_flips_to_503_while_draining(self):
        server, pid, port = start(self, "--idle-grace", "5")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        self.assertEqual((response.status, response.read()[:7]), (200, b"serving"))
        server.signal(pid, signal.SIGHUP)
        server.wait_handover(1)
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        self.assertEqual(response.status, 503)
        self.assertTrue(response.read().startswith(b"draining"))
        self.assertEqual(response.getheader("Connection"), "close")

    def test_post_in_flight_is_answered_once(self):
        server, pid, port = start(self)
        result = {}

        def post():
            result["r"] = http_get(port, "/slow?seconds=3", method="POST", body=b"x=1")

        t = threading.Thread(target=post)
        t.start()
        server.wait_inflight(pid)
        server.signal(pid, signal.SIGHUP)
        new = server.wait_handover(1)
        t.join(30)
        status, body, headers = result["r"]
        self.assertEqual((status, pid_in(body)), (200, pid))
        drain = server.wait_exit_line(pid)["drain"]
        self.assertEqual((drain["busy_at_start"], drain["cut"]), (1, 0))
        # Run once: once every process is gone, we have read all it printed.
        server.signal(new, signal.SIGTERM)
        server.wait_all_exited()
        self.assertEqual(server.count(rf"pid {pid}: slow request #1 done"), 1)


class ConnectionLevelDrainTests(unittest.TestCase):
    def test_busy_connection_served_until_client_closes(self):
        server, pid, port = start(self, "--drain", "connection")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        response = conn.getresponse()
        self.assertEqual(pid_in(response.read().decode()), pid)
        server.signal(pid, signal.SIGHUP)
        new = server.wait_handover(1)
        for _ in range(5):
            conn.request("GET", "/")
            response = conn.getresponse()
            self.assertEqual(pid_in(response.read().decode()), pid)
            self.assertIsNone(response.getheader("Connection"))
        self.assertTrue(pid_alive(pid))
        status, body, _ = http_get(port)
        self.assertEqual(pid_in(body), new)
        conn.close()
        drain = server.wait_exit_line(pid)["drain"]
        self.assertEqual((drain["connections_at_start"], drain["closed_by_client"],
                          drain["closed_by_server"], drain["cut"]), (1, 1, 0, 0))

    def test_drain_timeout_closes_at_the_next_boundary(self):
        server, pid, port = start(self, "--drain", "connection", "--drain-timeout", "1")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("GET", "/")
        conn.getresponse().read()
        server.signal(pid, signal.SIGHUP)
        server.wait_handover(1)
        drain = server.wait_exit_line(pid)["drain"]
        self.assertEqual((drain["connections_at_start"], drain["closed_by_server"],
                          drain["closed_by_client"], drain["cut"]), (1, 1, 0, 0))
        self.assertGreaterEqual(drain["duration_seconds"], 1.0)
        server.assert_output(r"Drain timeout \(1.0 s\) reached")


class TransactionProtocolDrainTests(unittest.TestCase):
    """
    The transaction protocol drains through the same tracker.
    """

    def start(self, *extra):
        from tests.test_txn_e2e import graceful

        server = graceful(self, *extra)
        pid, ports = server.wait_listening()
        server.wait_ready(1)
        return server, pid, ports

    def test_idle_client_gets_421_promptly(self):
        from tests.test_txn_e2e import DRAINING, TxnClient

        server, pid, ports = self.start("--idle-grace", "30")
        client = TxnClient(ports["txn"])
        self.addCleanup(client.close)
        self.assertEqual(client.ask("PING")[:3], "250")
        started = time.monotonic()
        server.signal(pid, signal.SIGHUP)
        server.wait_handover(1)
        lines = client.read_eof()
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], DRAINING.pattern)
        # Promptly: not after the HTTP idle grace (30 s) nor the drain timeout.
        self.assertLess(time.monotonic() - started, 15)
        server.wait_exit_line(pid)

    def test_hard_deadline_rolls_back_an_open_transaction(self):
        from tests.test_txn_e2e import TxnClient, db_rows

        server, pid, ports = self.start("--drain-timeout", "1", "--abort-grace", "1")
        client = TxnClient(ports["txn"])
        self.addCleanup(client.close)
        self.assertEqual(client.ask("BEGIN"), "250 begin")
        self.assertEqual(client.ask("SET stuck 1"), "250 queued")
        server.signal(pid, signal.SIGHUP)
        server.wait_handover(1)
        drain = server.wait_exit_line(pid)["drain"]
        self.assertEqual((drain["busy_at_start"], drain["cut"]), (1, 1))
        # The operator reads which connection was cut, and why.
        server.assert_output(r"Cutting txn connection from 127\.0\.0\.1:\d+ \(in a transaction\)")
        server.wait_gone(pid, timeout=20)
        # The client sees its connection end (or reset), never a commit.
        try:
            seen = client.read_eof()
        except ConnectionResetError:
            seen = []
        self.assertNotIn("250 committed", " ".join(seen))
        kv, txns = db_rows(server.db)
        self.assertNotIn("stuck", kv)
        self.assertEqual(txns, [])


class ShutdownDelayTests(unittest.TestCase):
    """
    --shutdown-delay: on SIGTERM/SIGINT, /healthz says 503 at once while the
    server goes on accepting and serving; then it drains. SIGHUP never waits.
    """

    def healthz(self, port):
        status, body, _ = http_get(port, "/healthz")
        return status, body.split(" ")[0]

    def test_sigterm_keeps_serving_with_healthz_503_then_drains(self):
        server, pid, port = start(self, "--shutdown-delay", "60")
        self.assertEqual(self.healthz(port), (200, "serving"))
        server.signal(pid, signal.SIGTERM)
        server.wait_for(rf"pid {pid} generation 1: shutting down: /healthz answers 503; still "
                        rf"accepting and serving for 60 s \(--shutdown-delay\) before draining")
        # New connections are still accepted and served, by the same process.
        self.assertEqual(self.healthz(port), (503, "draining"))
        status, body, _ = http_get(port, "/")
        self.assertEqual((status, pid_in(body)), (200, pid))
        self.assertEqual(server.count(r"no longer accepting"), 0)
        # Asked again: no more waiting.
        server.signal(pid, signal.SIGTERM)
        server.wait_for(rf"pid {pid} generation 1: SIGTERM during the shutdown delay: "
                        rf"draining now")
        index, _ = server.wait_for(r"shutdown delay of 60 s over; draining")
        server.wait_for(r"shutting down; no longer accepting", start=index)
        server.wait_all_exited()

    def test_sigint_waits_the_delay_out(self):
        server, pid, port = start(self, "--shutdown-delay", "0.5")
        server.signal(pid, signal.SIGINT)
        index, _ = server.wait_for(rf"pid {pid} generation 1: shutting down: /healthz answers "
                                   rf"503")
        index, _ = server.wait_for(r"shutdown delay of 0.5 s over; draining", start=index)
        server.wait_exit_line(pid)
        server.wait_all_exited()

    def test_sighup_does_not_wait_and_is_refused_during_the_delay(self):
        server, pid, port = start(self, "--shutdown-delay", "60")
        server.signal(pid, signal.SIGHUP)
        new = server.wait_handover(1)
        server.wait_exit_line(pid)  # the old generation drained at once
        self.assertEqual(server.count(r"shutdown delay|--shutdown-delay"), 0)
        server.signal(new, signal.SIGTERM)
        index, _ = server.wait_for(rf"pid {new} generation 2: shutting down: /healthz answers "
                                   rf"503")
        server.signal(new, signal.SIGHUP)
        server.wait_for(rf"pid {new} generation 2: SIGHUP ignored: shutting down \(in its "
                        rf"--shutdown-delay\)", start=index)
        self.assertEqual(self.healthz(port), (503, "draining"))
        server.signal(new, signal.SIGTERM)
        server.wait_for(r"draining now", start=index)
        server.wait_all_exited()
        self.assertEqual(server.count(r"starting generation 3"), 0)


def start_master(testcase, *extra):
    """
    `twistd graceful --workers 1`: (server, master pid, worker pid, HTTP port).
    """
    server = ServerProcess(
        testcase, ["graceful", "--port", LOOPBACK, "--slow-every", "0", "--workers", "1"]
        + list(extra)).start()
    _, m = server.wait_for(r"master pid (\d+): listening on http=tcp:127\.0\.0\.1:(\d+)")
    master, port = int(m.group(1)), int(m.group(2))
    _, m = server.wait_for(r"master pid \d+: workers generation 1 serve \(pids (\d+)\)")
    return server, master, int(m.group(1)), port


class MasterShutdownDelayTests(unittest.TestCase):
    """
    The same with a master: its SIGTERM makes every worker say 503 and go on
    serving for the delay; an upgrade (new workers, the old ones drain) never
    waits.
    """

    healthz = ShutdownDelayTests.healthz

    def test_sigterm_to_the_master_workers_say_503_and_serve_then_drain(self):
        server, master, worker, port = start_master(self, "--shutdown-delay", "60")
        self.assertEqual(self.healthz(port), (200, "serving"))
        server.signal(master, signal.SIGTERM)
        index, _ = server.wait_for(rf"master pid {master}: shutting down: the workers' "
                                   rf"/healthz answers 503; still accepting and serving for 60 s")
        server.wait_for(rf"pid {worker} generation 1: the master is shutting down: /healthz "
                        rf"answers 503", start=index)
        self.assertEqual(self.healthz(port), (503, "draining"))
        status, body, _ = http_get(port, "/")
        self.assertEqual((status, pid_in(body)), (200, worker))
        server.signal(master, signal.SIGHUP)
        server.wait_for(rf"master pid {master}: SIGHUP ignored: shutting down \(in its "
                        rf"--shutdown-delay\)", start=index)
        server.signal(master, signal.SIGTERM)
        server.wait_for(rf"master pid {master}: SIGTERM during the shutdown delay: the workers "
                        rf"drain now", start=index)
        server.wait_all_exited()
        self.assertEqual(server.count(r"workers generation 2"), 0)

    def test_an_upgrade_retires_the_old_workers_at_once(self):
        server, master, worker, port = start_master(self, "--shutdown-delay", "60")
        server.signal(master, signal.SIGHUP)
        _, m = server.wait_for(rf"master pid {master}: workers generation 2 are ready after "
                               rf"\d+ ms \(pids (\d+)\)")
        new = int(m.group(1))
        server.wait_exit_line(worker)  # drained at once, not 60 s later
        self.assertEqual(server.count(r"shutdown delay|--shutdown-delay|the master is shutting down"), 0)
        self.assertEqual(self.healthz(port), (200, "serving"))
        status, body, _ = http_get(port, "/")
        self.assertEqual((status, pid_in(body)), (200, new))
        server.signal(master, signal.SIGTERM)
        server.wait_for(rf"pid {new} generation 2: the master is shutting down")
        server.signal(master, signal.SIGINT)
        server.wait_all_exited()
