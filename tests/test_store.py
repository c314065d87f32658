"""
The SQLite store: atomic commits, nothing left by a transaction that never
committed (aborted, failed, or cut by a crash), serializable commits from two
processes' worth of pools on one file.
"""

import os
import sqlite3
import subprocess
import sys

from twisted.internet import defer, reactor
from twisted.trial import unittest

from twisted_graceful.store import (
    Store,
    StoreBusy,
    TransactionFailed,
    apply_ops,
    keys_of,
    parse_integer,
)


class ApplyOpsTests(unittest.TestCase):
    def test_ops_apply_in_order(self):
        values = apply_ops(
            [("set", "a", "3"), ("incr", "a", 2), ("del", "b"), ("incr", "c", -4)],
            {"a": None, "b": "x"},
        )
        self.assertEqual(values, {"a": "5", "b": None, "c": "-4"})

    def test_incr_of_a_word_fails(self):
        with self.assertRaises(TransactionFailed) as e:
            apply_ops([("incr", "a", 1)], {"a": "apple"})
        self.assertIn("a is not an integer", str(e.exception))

    def test_incr_overflow_fails(self):
        with self.assertRaises(TransactionFailed):
            apply_ops([("incr", "a", 1)], {"a": str(2**63 - 1)})
        with self.assertRaises(TransactionFailed):
            apply_ops([("incr", "a", -1)], {"a": str(-(2**63))})

    def test_parse_integer(self):
        self.assertEqual(parse_integer("-12"), -12)
        for text in ("1.5", "+1", "1_000", " 1", "", "x", str(2**63), "1" * 40):
            self.assertIsNone(parse_integer(text), text)

    def test_keys_in_first_write_order(self):
        self.assertEqual(keys_of([("set", "b", "1"), ("del", "a"), ("incr", "b", 1)]), ["b", "a"])


class StoreTests(unittest.TestCase):
    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        self.store = self.open_store()

    def open_store(self, **kwargs):
        store = Store(self.path, reactor, generation=lambda: 7, **kwargs)
        store.startService()
        self.addCleanup(lambda: store.running and store.stopService())
        return store

    def raw(self):
        """
        A connection of our own, as another process would have.
        """
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5)
        self.addCleanup(conn.close)
        return conn

    @defer.inlineCallbacks
    def test_database_is_in_wal_mode(self):
        yield self.store.check()
        mode = self.raw().execute("PRAGMA journal_mode").fetchone()[0]
        self.assertEqual(mode, "wal")

    @defer.inlineCallbacks
    def test_commit_applies_every_write(self):
        result = yield self.store.commit(
            [("set", "apples", "3"), ("incr", "apples", 2), ("set", "pears", "x"), ("del", "figs")]
        )
        self.assertEqual(result.txid, 1)
        self.assertEqual(result.values, {"apples": "5", "pears": "x", "figs": None})
        values = yield self.store.get_many(["apples", "pears", "figs"])
        self.assertEqual(values, {"apples": "5", "pears": "x", "figs": None})

    @defer.inlineCallbacks
    def test_each_commit_is_one_transaction_row(self):
        first = yield self.store.commit([("set", "a", "1")])
        second = yield self.store.commit([("incr", "a", 1), ("set", "b", "2")])
        rows = yield self.store.transactions()
        self.assertEqual([r["txid"] for r in rows], [first.txid, second.txid])
        self.assertEqual(rows[1]["ops"], [("incr", "a", 1), ("set", "b", "2")])
        self.assertEqual(rows[1]["result"], {"a": "2", "b": "2"})
        self.assertEqual(rows[1]["pid"], os.getpid())
        self.assertEqual(rows[1]["generation"], 7)

    @defer.inlineCallbacks
    def test_failed_commit_applies_nothing(self):
        yield self.store.commit([("set", "a", "apple")])
        yield self.assertFailure(
            self.store.commit([("set", "b", "1"), ("del", "c"), ("incr", "a", 1)]),
            TransactionFailed,
        )
        values = yield self.store.get_many(["a", "b"])
        self.assertEqual(values, {"a": "apple", "b": None})
        rows = yield self.store.transactions()
        self.assertEqual(len(rows), 1)

    @defer.inlineCallbacks
    def test_crash_between_begin_and_commit_leaves_nothing(self):
        """
        A process that took the write lock and wrote, then died before
        COMMIT: nothing of it is in the database, and the lock is free.
        """
        yield self.store.commit([("set", "a", "1")])
        script = (
            "import os, sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\n"
            "c.execute(\"UPDATE kv SET value = '99' WHERE key = 'a'\")\n"
            "c.execute(\"INSERT INTO kv VALUES ('b', 'half')\")\n"
            "c.execute(\"INSERT INTO txns (committed_at, pid, ops, result) "
            "VALUES (0, 0, '[]', '{}')\")\n"
            "os._exit(9)\n"
        )
        done = subprocess.run([sys.executable, "-c", script, self.path], timeout=30)
        self.assertEqual(done.returncode, 9)
        values = yield self.store.get_many(["a", "b"])
        self.assertEqual(values, {"a": "1", "b": None})
        rows = yield self.store.transactions()
        self.assertEqual(len(rows), 1)
        result = yield self.store.commit([("incr", "a", 1)])
        self.assertEqual(result.values, {"a": "2"})

    @defer.inlineCallbacks
    def test_concurrent_increments_from_two_stores_are_serializable(self):
        """
        Two pools on one file (as the old and the new generation): every INCR
        is applied exactly once, each in its own transaction row.
        """
        other = self.open_store()
        commits = []
        for i in range(60):
            store = self.store if i % 2 else other
            commits.append(store.commit([("incr", "n", 1), ("set", f"k{i}", str(i))]))
        results = yield defer.gatherResults(commits)
        self.assertEqual(sorted(int(r.values["n"]) for r in results), list(range(1, 61)))
        self.assertEqual(len({r.txid for r in results}), 60)
        value = yield self.store.get("n")
        self.assertEqual(value, "60")
        rows = yield other.transactions()
        self.assertEqual(len(rows), 60)

    @defer.inlineCallbacks
    def test_locked_database_is_busy_and_applies_nothing(self):
        store = self.open_store(busy_timeout=0.2)
        yield store.check()
        blocker = self.raw()
        blocker.execute("BEGIN IMMEDIATE")
        try:
            yield self.assertFailure(store.commit([("set", "a", "1")]), StoreBusy)
        finally:
            blocker.execute("ROLLBACK")
        value = yield store.get("a")
        self.assertIsNone(value)
        result = yield store.commit([("set", "a", "1")])
        self.assertEqual(result.values, {"a": "1"})

    @defer.inlineCallbacks
    def test_stop_waits_for_commits_in_flight(self):
        d = self.store.commit([("set", "a", "1")])
        stopped = self.store.stopService()
        result = yield d
        yield stopped
        self.assertEqual(result.values, {"a": "1"})
        row = self.raw().execute("SELECT value FROM kv WHERE key = 'a'").fetchone()
        self.assertEqual(row, ("1",))

    @defer.inlineCallbacks
    def test_closed_store_refuses(self):
        yield self.store.stopService()
        yield self.assertFailure(self.store.get("a"), StoreBusy)

    def test_empty_commit_is_a_programming_error(self):
        self.assertRaises(ValueError, self.store.commit, [])
