"""
End to end: the transaction protocol and C{/kv} on real C{twistd graceful}
processes across SIGHUP upgrades, checked against the database itself: each
test runs on SQLite and on a real PostgreSQL (see C{tests/pg.py}).
"""

import json
import os
import re
import signal
import socket
import sqlite3
import threading
import time

from twisted.trial import unittest

from tests import pg
from tests.e2e import ServerProcess, http_get

LOOPBACK = "tcp:0:interface=127.0.0.1"
COMMITTED = re.compile(r"^250 committed txid=(\d+) ")
DRAINING = re.compile(r"^421 closing: pid (\d+) generation (\d+) draining, reconnect$")


def graceful(testcase, *extra, db=None):
    """
    C{twistd graceful} on loopback with its own store: C{db}, else the
    test's C{backend} (a fresh SQLite file, or a fresh PostgreSQL database).
    """
    cwd = os.path.abspath(testcase.mktemp())
    os.makedirs(cwd)
    if db is None:
        if getattr(testcase, "backend", "sqlite") == "postgresql":
            db = pg.database_url(testcase)
        else:
            db = os.path.join(cwd, "txn.sqlite3")
    args = ["graceful", "--port", LOOPBACK, "--txn-port", LOOPBACK, "--db", db,
            "--slow-every", "0"] + list(extra)
    server = ServerProcess(testcase, args, cwd=cwd).start()
    server.db = db
    return server


class Closed(Exception):
    """
    The server closed the connection.
    """


class TxnClient:
    """
    A blocking client of the transaction protocol.
    """

    def __init__(self, port, timeout=15.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.greeting = self.read()
        m = re.match(r"^220 twisted-graceful txn ready, pid (\d+) generation (\d+)$",
                     self.greeting)
        if not m:
            raise AssertionError(f"unexpected greeting {self.greeting!r}")
        self.pid, self.generation = int(m.group(1)), int(m.group(2))

    def send(self, *lines):
        self.sock.sendall(b"".join(line.encode() + b"\r\n" for line in lines))

    def read(self):
        line = self.file.readline()
        if not line:
            raise Closed()
        return line.decode("utf-8").rstrip("\r\n")

    def ask(self, line):
        self.send(line)
        return self.read()

    def read_eof(self):
        """
        Read until the server closes; return what came.
        """
        lines = []
        while True:
            try:
                lines.append(self.read())
            except Closed:
                return lines

    def close(self):
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


def db_rows(path):
    """
    (kv dict, list of txns rows as dicts) read straight from the file or
    the PostgreSQL database.
    """
    if path.startswith("postgresql://"):
        return pg.rows(path)
    conn = sqlite3.connect(path)
    try:
        kv = dict(conn.execute("SELECT key, value FROM kv"))
        txns = [
            {"txid": r[0], "pid": r[1], "generation": r[2], "ops": json.loads(r[3])}
            for r in conn.execute("SELECT txid, pid, generation, ops FROM txns ORDER BY txid")
        ]
        return kv, txns
    finally:
        conn.close()


class TransactionAcrossUpgradeTests(unittest.TestCase):
    backend = "sqlite"

    def test_transaction_open_at_sighup_commits_on_the_old_pid_once(self):
        """
        BEGIN before SIGHUP, COMMIT after the new generation serves: the old
        process commits it, acknowledges it, then says 421 and closes. The
        database holds it exactly once; HTTP on the new process sees it.
        """
        server = graceful(self)
        old_pid, ports = server.wait_listening()
        server.wait_ready(1)
        busy = TxnClient(ports["txn"])
        self.addCleanup(busy.close)
        idle = TxnClient(ports["txn"])
        self.addCleanup(idle.close)
        self.assertEqual(busy.pid, old_pid)
        for line, reply in (("BEGIN", "250 begin"), ("SET across upgrade", "250 queued"),
                            ("INCR counter 5", "250 queued")):
            self.assertEqual(busy.ask(line), reply)

        server.signal(old_pid, signal.SIGHUP)
        new_pid = server.wait_handover(1)
        # The idle connection is closed at once, with a 421 naming the old pid.
        self.assertEqual(idle.read_eof(),
                         [f"421 closing: pid {old_pid} generation 1 draining, reconnect"])
        fresh = TxnClient(ports["txn"])
        self.addCleanup(fresh.close)
        self.assertEqual((fresh.pid, fresh.generation), (new_pid, 2))
        self.assertEqual(fresh.ask("GET across"), "550 no such key: across")

        # Still open on the old process: finish it there.
        self.assertEqual(busy.ask("INCR counter"), "250 queued")
        busy.send("COMMIT", "SET after boundary")  # the second is pipelined: never executed
        reply = busy.read()
        m = COMMITTED.match(reply)
        self.assertTrue(m, reply)
        self.assertEqual(reply, f"250 committed txid={m.group(1)} across=upgrade counter=6")
        self.assertEqual(busy.read_eof(),
                         [f"421 closing: pid {old_pid} generation 1 draining, reconnect"])
        txid = int(m.group(1))

        self.assertEqual(fresh.ask("GET counter"), "250 counter=6")
        self.assertEqual(fresh.ask("GET after"), "550 no such key: after")
        status, body, _ = http_get(ports["http"], "/kv/across")
        self.assertEqual((status, body), (200, "upgrade\n"))
        status, _, _ = http_get(ports["http"], "/kv/after")
        self.assertEqual(status, 404)

        server.wait_exit_line(old_pid)
        fresh.close()
        server.signal(new_pid, signal.SIGTERM)
        server.wait_all_exited()
        kv, txns = db_rows(server.db)
        self.assertEqual(kv, {"across": "upgrade", "counter": "6"})
        self.assertEqual(len(txns), 1)
        self.assertEqual(txns[0]["txid"], txid)
        self.assertEqual((txns[0]["pid"], txns[0]["generation"]), (old_pid, 1))


class ClientLoop:
    """
    C{workers} clients, each running transactions on fresh connections one
    after the other until told to stop: alternately pipelined (all commands
    at once) and step by step. Each attempt writes its own key, so every
    attempt can be found (or not) in the database afterwards.
    """

    def __init__(self, port, workers=3, max_attempts=3000, deadline=180.0):
        self.port = port
        self.max_attempts = max_attempts
        self.deadline = time.monotonic() + deadline
        self.acked = {}  # key -> (txid, pid, value)
        self.unacked = []  # (key, reason) for attempts refused before COMMIT ran
        self.in_doubt = []  # (key, what happened): COMMIT sent, no answer
        self.errors = []
        self.pids = set()
        self.stop = threading.Event()
        self.progress = threading.Condition()
        self.threads = [threading.Thread(target=self.run, args=(w,), daemon=True)
                        for w in range(workers)]

    def start(self):
        for thread in self.threads:
            thread.start()

    def join(self, timeout):
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self.threads)

    def count(self):
        with self.progress:
            return len(self.acked)

    def wait_count(self, n, timeout=60.0):
        deadline = time.monotonic() + timeout
        with self.progress:
            while len(self.acked) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not any(t.is_alive() for t in self.threads):
                    raise AssertionError(
                        f"{len(self.acked)} transactions acknowledged, waited for {n}; "
                        f"errors: {self.errors[-5:]}, in doubt: {self.in_doubt[-5:]}")
                self.progress.wait(min(remaining, 1.0))

    def run(self, worker):
        try:
            for attempt in range(self.max_attempts):
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    return
                self.one(f"w{worker}t{attempt}", attempt)
        except Exception as e:  # reported by the test
            self.errors.append(f"client loop crashed: {e!r}")
        finally:
            with self.progress:
                self.progress.notify_all()

    def one(self, key, attempt):
        value = f"v-{key}-{os.getpid()}"
        try:
            client = TxnClient(self.port)
        except OSError as e:
            self.errors.append(f"attempt {attempt}: connect: {e!r}")
            return
        commit_sent = False
        try:
            self.pids.add(client.pid)
            commands = ["BEGIN", f"SET {key} {value}", "INCR total", "COMMIT"]
            expected = ["250 begin", "250 queued", "250 queued"]
            if attempt % 2:
                client.send(*commands)
                commit_sent = True
                replies = []
                for _ in range(4):
                    replies.append(client.read())
                    if DRAINING.match(replies[-1]):
                        break  # nothing after a 421 runs; the server closes
            else:
                replies = []
                for command in commands:
                    commit_sent = command == "COMMIT"
                    replies.append(client.ask(command))
                    if not replies[-1].startswith("250"):
                        break
            if replies[:3] == expected and len(replies) == 4:
                m = COMMITTED.match(replies[3])
                if not m:
                    self.in_doubt.append((key, f"COMMIT answered {replies[3]!r}"))
                    return
                with self.progress:
                    self.acked[key] = (int(m.group(1)), client.pid, value)
                    self.progress.notify_all()
            elif DRAINING.match(replies[-1]) and (not commit_sent or attempt % 2):
                # Draining before this transaction began (BEGIN or a pipelined
                # batch was answered with 421): nothing ran; reconnect.
                self.unacked.append((key, replies[-1]))
            else:
                self.errors.append(f"attempt {attempt}: unexpected replies {replies!r}")
        except (Closed, OSError) as e:
            where = "after COMMIT was sent" if commit_sent else "before COMMIT"
            if commit_sent:
                self.in_doubt.append((key, f"{e!r} {where}"))
            else:
                self.errors.append(f"attempt {attempt}: {e!r} {where}")
        finally:
            client.close()


class ManyTransactionsTests(unittest.TestCase):
    backend = "sqlite"

    def test_300_transactions_across_3_upgrades(self):
        """
        Every acknowledged commit is in the database exactly once, nothing
        unacknowledged is, and no connection is refused, reset or left
        without the answer to its COMMIT.
        """
        server = graceful(self)
        pid, ports = server.wait_listening()
        server.wait_ready(1)
        loop = ClientLoop(ports["txn"])
        loop.start()
        self.addCleanup(loop.stop.set)
        pids = [pid]
        for generation in (1, 2, 3):
            loop.wait_count(60 * generation)
            server.signal(pids[-1], signal.SIGHUP)
            pids.append(server.wait_handover(generation))
        after_last = loop.count()
        loop.wait_count(max(300, after_last + 40))
        loop.stop.set()
        self.assertTrue(loop.join(30), "client threads did not stop")
        for old in pids[:-1]:
            server.wait_exit_line(old)
        server.signal(pids[-1], signal.SIGTERM)
        server.wait_all_exited()

        self.assertEqual(loop.errors, [])
        self.assertEqual(loop.in_doubt, [])
        self.assertGreaterEqual(len(loop.acked), 300)
        self.assertEqual(loop.pids, set(pids), "every generation served transactions")

        kv, txns = db_rows(server.db)
        txids = [txid for txid, _, _ in loop.acked.values()]
        self.assertEqual(len(set(txids)), len(txids), "a txid acknowledged twice")
        by_txid = {row["txid"]: row for row in txns}
        written = {}
        for row in txns:
            for op in row["ops"]:
                if op[1] != "total":
                    written.setdefault(op[1], []).append(row["txid"])
        for key, (txid, pid, value) in loop.acked.items():
            self.assertEqual(written.get(key), [txid], f"{key} is not in exactly one txn row")
            self.assertEqual(by_txid[txid]["pid"], pid)
            self.assertEqual(kv.get(key), value)
        for key, reason in loop.unacked:
            self.assertNotIn(key, kv, f"{key} was applied though it was refused: {reason}")
            self.assertNotIn(key, written)
        self.assertEqual(set(written), set(loop.acked), "a transaction nobody acknowledged")
        self.assertEqual(len(txns), len(loop.acked))
        self.assertEqual(kv["total"], str(len(loop.acked)))
        self.assertEqual({row["pid"] for row in txns}, set(pids))


class KVAcrossUpgradesTests(unittest.TestCase):
    backend = "sqlite"

    def test_posts_across_upgrades_are_applied_exactly_once(self):
        """
        Clients POST /kv/<key> incr=1 on fresh connections while the server
        upgrades twice: every POST is answered 200 and applied once; GET
        /kv on the last generation sees the sum.
        """
        server = graceful(self)
        pid, ports = server.wait_listening()
        server.wait_ready(1)
        stop = threading.Event()
        acked, errors = [0, 0, 0], []
        progress = threading.Condition()

        def client(i):
            deadline = time.monotonic() + 120
            for _ in range(5000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    status, body, _ = http_get(
                        ports["http"], f"/kv/posts{i}", method="POST", body=b"incr=1",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
                except OSError as e:
                    errors.append(repr(e))
                    continue
                if status != 200 or not body.startswith("committed txid="):
                    errors.append(f"{status} {body!r}")
                    continue
                with progress:
                    acked[i] += 1
                    progress.notify_all()

        def wait_total(n):
            deadline = time.monotonic() + 60
            with progress:
                while sum(acked) < n:
                    self.assertLess(time.monotonic(), deadline, f"{acked} POSTs; errors {errors}")
                    progress.wait(1.0)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        self.addCleanup(stop.set)
        pids = [pid]
        for generation in (1, 2):
            wait_total(40 * generation)
            server.signal(pids[-1], signal.SIGHUP)
            pids.append(server.wait_handover(generation))
        wait_total(sum(acked) + 30)
        stop.set()
        for t in threads:
            t.join(30)
        self.assertEqual(errors, [])
        for i in range(3):
            status, body, _ = http_get(ports["http"], f"/kv/posts{i}")
            self.assertEqual((status, body), (200, f"{acked[i]}\n"))
        server.signal(pids[-1], signal.SIGTERM)
        server.wait_all_exited()
        kv, txns = db_rows(server.db)
        self.assertEqual(len(txns), sum(acked))
        self.assertEqual({k: int(v) for k, v in kv.items()},
                         {f"posts{i}": acked[i] for i in range(3)})


class TransactionAcrossUpgradePostgresTests(TransactionAcrossUpgradeTests):
    backend = "postgresql"


class ManyTransactionsPostgresTests(ManyTransactionsTests):
    backend = "postgresql"


class KVAcrossUpgradesPostgresTests(KVAcrossUpgradesTests):
    backend = "postgresql"


class PostgresAvailabilityTests(unittest.TestCase):
    """
    The database is a separate server: it can be down when a generation
    starts, or go away while one serves.
    """

    def setUp(self):
        reason = pg.unavailable()
        if reason:
            raise unittest.SkipTest(reason)

    def test_unreachable_at_start_fails_readiness_with_the_reason(self):
        url = f"postgresql://graceful@127.0.0.1:{pg.free_port()}/nothing"
        server = graceful(self, "--ready-timeout", "2", db=url)
        server.wait_for(r"readiness check failed \(attempt 1\): PostgreSQL "
                        + re.escape(url) + r": .*refused")
        server.wait_for(r"not ready after \d+ attempt\(s\), giving up: PostgreSQL")
        server.wait_all_exited()
        self.assertNotEqual(server.proc.returncode, 0)

    def test_database_down_during_upgrade_and_while_serving(self):
        """
        The database stops: a transaction's COMMIT and a POST get a clear
        error (no 250, no 200); an upgrade fails its readiness check with the
        reason and the old generation keeps serving. The database comes
        back: the same generation commits again and the next upgrade works.
        """
        database = pg.own_server(self)
        server = graceful(self, "--ready-timeout", "3", db=database.new_database())
        pid, ports = server.wait_listening()
        server.wait_ready(1)
        client = TxnClient(ports["txn"])
        self.addCleanup(client.close)
        self.assertTrue(COMMITTED.match(client.ask("INCR n")))
        self.assertEqual(client.ask("BEGIN"), "250 begin")
        self.assertEqual(client.ask("INCR n"), "250 queued")

        database.stop("immediate")
        reply = client.ask("COMMIT")
        self.assertTrue(reply.startswith("451 database busy (PostgreSQL "), reply)
        self.assertTrue(reply.endswith("; nothing applied, try again"), reply)
        status, body, _ = http_get(ports["http"], "/kv/n", method="POST", body=b"incr=1",
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(status, 503)
        self.assertTrue(body.startswith("not committed: PostgreSQL "), body)

        mark = len(server.lines)
        server.signal(pid, signal.SIGHUP)
        server.wait_for(r"Upgrade failed: .* This generation keeps serving", start=mark)
        server.wait_for(r"not ready after \d+ attempt\(s\), giving up: PostgreSQL .*", start=mark)
        status, body, _ = http_get(ports["http"], "/")
        self.assertEqual(status, 200)
        self.assertIn(f"pid {pid} ", body)

        database.start()
        self.assertTrue(COMMITTED.match(client.ask("INCR n")))
        self.assertEqual(client.ask("GET n"), "250 n=2")
        client.close()
        # The failed upgrade backs off: this SIGHUP starts it now or once the backoff ends.
        mark = len(server.lines)
        server.signal(pid, signal.SIGHUP)
        server.wait_for(r"starting generation 2", start=mark)
        new_pid = server.wait_handover(1)
        status, body, _ = http_get(ports["http"], "/kv/n")
        self.assertEqual((status, body), (200, "2\n"))
        server.signal(new_pid, signal.SIGTERM)
        server.wait_all_exited()
