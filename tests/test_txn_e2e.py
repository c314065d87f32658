"""
End to end: the transaction protocol on real C{twistd graceful} processes
across SIGHUP upgrades, checked against the SQLite file itself.
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

from tests.e2e import ServerProcess, http_get

LOOPBACK = "tcp:0:interface=127.0.0.1"
COMMITTED = re.compile(r"^250 committed txid=(\d+) ")
DRAINING = re.compile(r"^421 closing: pid (\d+) generation (\d+) draining, reconnect$")


def graceful(testcase, *extra):
    cwd = os.path.abspath(testcase.mktemp())
    os.makedirs(cwd)
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
    (kv dict, list of txns rows as dicts) read straight from the file.
    """
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
