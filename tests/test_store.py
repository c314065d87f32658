"""
The store, on SQLite and on a real PostgreSQL: atomic commits, nothing left
by a transaction that never committed (aborted, failed, or cut by a crash),
serializable commits from two processes' (or hosts') worth of pools on one
database; on PostgreSQL, an unreachable or lost database answers clearly and
never with a false commit.
"""

import os
import sqlite3
import subprocess
import sys

from twisted.internet import defer, reactor
from twisted.trial import unittest

from twisted_graceful.store import (
    CommitOutcomeUnknown,
    KeyReused,
    Store,
    StoreBusy,
    TransactionFailed,
    advisory_key,
    apply_ops,
    keys_of,
    parse_integer,
    redact,
)

from tests import pg


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


class StoreContract:
    """
    What every backend must do. Subclasses say how to open a store on a
    fresh database (C{make_db}) and read a value behind the store's back.
    """

    def setUp(self):
        self.db = self.make_db()
        self.store = self.open_store()

    def open_store(self, **kwargs):
        store = Store(self.db, reactor, generation=lambda: 7, **kwargs)
        store.startService()
        self.addCleanup(lambda: store.running and store.stopService())
        return store

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
        count = yield self.store.check()
        self.assertEqual(count, 2)

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
        # The connection is still good.
        result = yield self.store.commit([("set", "a", "1")])
        self.assertEqual(result.values, {"a": "1"})

    @defer.inlineCallbacks
    def test_concurrent_increments_from_two_stores_are_serializable(self):
        """
        Two pools on one database (as the old and the new generation, or two
        hosts), on keys that do not exist yet: every INCR is applied exactly
        once, each in its own transaction row.
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
    def test_stop_waits_for_commits_in_flight(self):
        d = self.store.commit([("set", "a", "1")])
        stopped = self.store.stopService()
        result = yield d
        yield stopped
        self.assertEqual(result.values, {"a": "1"})
        self.assertEqual(self.read_value("a"), "1")

    @defer.inlineCallbacks
    def test_closed_store_refuses(self):
        yield self.store.stopService()
        yield self.assertFailure(self.store.get("a"), StoreBusy)

    def test_empty_commit_is_a_programming_error(self):
        self.assertRaises(ValueError, self.store.commit, [])

    @defer.inlineCallbacks
    def test_a_transaction_sent_again_under_its_key_applies_once(self):
        """
        A client that lost the reply sends the same transaction with the same
        idempotency key: the first result again, nothing applied twice.
        """
        ops = [("incr", "n", 5), ("set", "tag", "x")]
        first = yield self.store.commit(ops, idempotency_key="client-1:42")
        yield self.store.commit([("incr", "n", 1)])
        again = yield self.store.commit(ops, idempotency_key="client-1:42")
        self.assertFalse(first.replayed)
        self.assertTrue(again.replayed)
        self.assertEqual((again.txid, again.values), (first.txid, {"n": "5", "tag": "x"}))
        self.assertEqual(self.read_value("n"), "6")
        rows = yield self.store.transactions()
        self.assertEqual(len(rows), 2)

    @defer.inlineCallbacks
    def test_copies_racing_on_two_pools_apply_once(self):
        """
        The same keyed transaction sent through two pools at once (a retry
        reaching another worker or host while the first copy commits).
        """
        other = self.open_store()
        ops = [("incr", "n", 1)]
        results = yield defer.gatherResults([
            (self.store if i % 2 else other).commit(ops, idempotency_key=f"k{i // 4}")
            for i in range(16)])
        self.assertEqual(self.read_value("n"), "4")
        self.assertEqual(sum(not r.replayed for r in results), 4)
        self.assertEqual(len({r.txid for r in results}), 4)

    @defer.inlineCallbacks
    def test_a_key_reused_for_other_writes_is_refused(self):
        yield self.store.commit([("set", "a", "1")], idempotency_key="once")
        failure = yield self.assertFailure(
            self.store.commit([("set", "a", "2")], idempotency_key="once"), KeyReused)
        self.assertIn("idempotency key once names another transaction", str(failure))
        self.assertEqual(self.read_value("a"), "1")

    def test_a_malformed_key_is_a_programming_error(self):
        for key in ("", "has space", "x" * 201, "tab\t"):
            self.assertRaises(ValueError, self.store.commit, [("set", "a", "1")],
                              idempotency_key=key)


class SQLiteStoreTests(StoreContract, unittest.TestCase):
    def make_db(self):
        self.path = os.path.abspath(self.mktemp())
        return self.path

    def raw(self):
        """
        A connection of our own, as another process would have.
        """
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5)
        self.addCleanup(conn.close)
        return conn

    def read_value(self, key):
        row = self.raw().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def test_a_path_is_sqlite(self):
        self.assertEqual(self.store.description, f"SQLite {self.path} (WAL mode)")

    @defer.inlineCallbacks
    def test_a_database_from_before_idempotency_keys_gets_the_column(self):
        """
        A file written by a release without idempotency keys (what an upgrade
        finds) keeps its rows and takes keyed commits.
        """
        yield self.store.stopService()
        path = os.path.abspath(self.mktemp())
        old = sqlite3.connect(path, isolation_level=None)
        old.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        old.execute("CREATE TABLE txns (txid INTEGER PRIMARY KEY AUTOINCREMENT, committed_at "
                    "REAL NOT NULL, pid INTEGER NOT NULL, generation INTEGER, ops TEXT NOT NULL,"
                    " result TEXT NOT NULL)")
        old.execute("INSERT INTO kv VALUES ('n', '1')")
        old.execute("INSERT INTO txns (committed_at, pid, ops, result) "
                    "VALUES (0, 1, '[[\"set\", \"n\", \"1\"]]', '{\"n\": \"1\"}')")
        old.close()
        self.path = self.db = path
        self.store = self.open_store()
        first = yield self.store.commit([("incr", "n", 1)], idempotency_key="k")
        again = yield self.store.commit([("incr", "n", 1)], idempotency_key="k")
        self.assertEqual((first.txid, again.txid, again.replayed), (2, 2, True))
        self.assertEqual(self.read_value("n"), "2")

    @defer.inlineCallbacks
    def test_database_is_in_wal_mode(self):
        yield self.store.check()
        mode = self.raw().execute("PRAGMA journal_mode").fetchone()[0]
        self.assertEqual(mode, "wal")

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


class PostgresStoreTests(StoreContract, unittest.TestCase):
    """
    The same contract on a real PostgreSQL, and what only a database over
    the network does: be unreachable, lose connections, be locked by another
    host.
    """

    def make_db(self):
        return pg.database_url(self)

    def raw(self, **kwargs):
        import psycopg

        conn = psycopg.connect(self.db, connect_timeout=10, **kwargs)
        self.addCleanup(conn.close)
        return conn

    def read_value(self, key):
        row = self.raw().execute("SELECT value FROM kv WHERE key = %s", (key,)).fetchone()
        return row[0] if row else None

    def test_a_url_is_postgresql(self):
        self.assertEqual(self.store.description, f"PostgreSQL {self.db}")
        self.assertIsNone(self.store.path)

    def test_the_password_is_never_shown(self):
        self.assertEqual(redact("postgresql://app:s3cret@db.example:5432/kv"),
                         "postgresql://app:***@db.example:5432/kv")
        self.assertEqual(redact("postgresql://app@db:5432/kv"), "postgresql://app@db:5432/kv")
        store = Store("postgresql://app:s3cret@127.0.0.1:1/kv", reactor)
        self.assertNotIn("s3cret", store.description)

    def test_advisory_keys_are_stable_64_bit(self):
        self.assertEqual(advisory_key("apples"), advisory_key("apples"))
        self.assertNotEqual(advisory_key("apples"), advisory_key("pears"))
        self.assertTrue(-(2**63) <= advisory_key("apples") < 2**63)

    @defer.inlineCallbacks
    def test_schema_is_created_by_many_stores_at_once(self):
        """
        Hosts starting together on an empty database: each creates the
        tables if missing, under one lock, and none fails.
        """
        url = pg.shared_server().new_database()
        stores = []
        for _ in range(4):
            store = Store(url, reactor)
            store.startService()
            self.addCleanup(lambda s=store: s.running and s.stopService())
            stores.append(store)
        counts = yield defer.gatherResults([s.check() for s in stores])
        self.assertEqual(counts, [0, 0, 0, 0])

    @defer.inlineCallbacks
    def test_a_database_from_before_idempotency_keys_gets_the_column(self):
        """
        A database written by a release without idempotency keys keeps its
        rows and takes keyed commits; the column is added once.
        """
        import psycopg

        url = pg.shared_server().new_database()
        with psycopg.connect(url, connect_timeout=10) as conn:
            conn.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute("CREATE TABLE txns (txid BIGINT GENERATED BY DEFAULT AS IDENTITY "
                         "PRIMARY KEY, committed_at DOUBLE PRECISION NOT NULL, host TEXT NOT "
                         "NULL, pid INTEGER NOT NULL, generation INTEGER, ops TEXT NOT NULL, "
                         "result TEXT NOT NULL, token TEXT NOT NULL UNIQUE)")
            conn.execute("INSERT INTO kv VALUES ('n', '1')")
            conn.execute("INSERT INTO txns (committed_at, host, pid, ops, result, token) VALUES "
                         "(0, 'old', 1, '[[\"set\", \"n\", \"1\"]]', '{\"n\": \"1\"}', 't')")
        stores = []
        for _ in range(2):  # two hosts starting at once on the old database
            store = Store(url, reactor)
            store.startService()
            self.addCleanup(lambda s=store: s.running and s.stopService())
            stores.append(store)
        first = yield stores[0].commit([("incr", "n", 1)], idempotency_key="k")
        again = yield stores[1].commit([("incr", "n", 1)], idempotency_key="k")
        self.assertEqual((first.txid, again.txid, again.replayed), (2, 2, True))
        value = yield stores[1].get("n")
        self.assertEqual(value, "2")

    @defer.inlineCallbacks
    def test_many_hosts_increment_one_counter_exactly(self):
        """
        Four pools of three connections each increment two counters (one
        absent at first) in one transaction, 200 times: both end at 200.
        """
        stores = [self.store] + [self.open_store() for _ in range(3)]
        commits = [stores[i % 4].commit([("incr", "hot", 1), ("incr", f"other{i % 3}", 1),
                                         ("incr", "total", 1)])
                   for i in range(200)]
        yield defer.gatherResults(commits)
        values = yield self.store.get_many(["hot", "total", "other0", "other1", "other2"])
        self.assertEqual(values["hot"], "200")
        self.assertEqual(values["total"], "200")
        self.assertEqual(sum(int(values[f"other{i}"]) for i in range(3)), 200)

    @defer.inlineCallbacks
    def test_a_key_locked_by_another_host_is_busy_and_applies_nothing(self):
        store = self.open_store(busy_timeout=0.2)
        yield store.check()
        blocker = self.raw()
        blocker.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key("a"),))
        try:
            failure = yield self.assertFailure(store.commit([("set", "a", "1")]), StoreBusy)
            self.assertIn("lock timeout", str(failure))
        finally:
            blocker.rollback()
        value = yield store.get("a")
        self.assertIsNone(value)
        result = yield store.commit([("set", "a", "1")])
        self.assertEqual(result.values, {"a": "1"})

    @defer.inlineCallbacks
    def test_crash_between_begin_and_commit_leaves_nothing(self):
        yield self.store.commit([("set", "a", "1")])
        script = (
            "import os, sys, psycopg\n"
            "c = psycopg.connect(sys.argv[1])\n"
            "c.execute(\"UPDATE kv SET value = '99' WHERE key = 'a'\")\n"
            "c.execute(\"INSERT INTO kv VALUES ('b', 'half')\")\n"
            "c.execute(\"INSERT INTO txns (committed_at, host, pid, ops, result, token) "
            "VALUES (0, 'h', 0, '[]', '{}', 'x')\")\n"
            "os._exit(9)\n"
        )
        done = subprocess.run([sys.executable, "-c", script, self.db], timeout=30)
        self.assertEqual(done.returncode, 9)
        values = yield self.store.get_many(["a", "b"])
        self.assertEqual(values, {"a": "1", "b": None})
        result = yield self.store.commit([("incr", "a", 1)])
        self.assertEqual(result.values, {"a": "2"})
        rows = yield self.store.transactions()
        self.assertEqual(len(rows), 2)

    @defer.inlineCallbacks
    def test_unreachable_database_is_busy_with_the_reason(self):
        url = f"postgresql://nobody@127.0.0.1:{pg.free_port()}/nothing"
        store = Store(url, reactor)
        store.startService()
        self.addCleanup(store.stopService)
        failure = yield self.assertFailure(store.check(), StoreBusy)
        self.assertIn(f"PostgreSQL {url}:", str(failure))
        self.assertIn("refused", str(failure))

    @defer.inlineCallbacks
    def test_database_restart_while_serving(self):
        """
        The database stops: commits fail with the reason (nothing applied,
        no false success); it starts again: the next commit works on a new
        connection, without an error first.
        """
        server = pg.own_server(self)
        url = server.new_database()
        store = Store(url, reactor)
        store.startService()
        self.addCleanup(lambda: store.running and store.stopService())
        yield store.commit([("incr", "n", 1)])
        yield deferToThreadStop(server)
        failure = yield self.assertFailure(store.commit([("incr", "n", 1)]), StoreBusy)
        self.assertIn("PostgreSQL", str(failure))
        yield self.assertFailure(store.get("n"), StoreBusy)
        yield deferToThreadStart(server)
        result = yield store.commit([("incr", "n", 1)])
        self.assertEqual(result.values, {"n": "2"})
        rows = yield store.transactions()
        self.assertEqual(len(rows), 2)

    @defer.inlineCallbacks
    def test_connection_lost_during_commit_is_resolved_not_guessed(self):
        """
        The server process dies while COMMIT runs (a deferred trigger kills
        it): the store asks the database on a new connection whether the
        commit is there, and only says "not applied" once it knows.
        """
        conn = self.raw(autocommit=True)
        yield self.store.check()  # the tables exist
        conn.execute("""
            CREATE FUNCTION die_at_commit() RETURNS trigger AS $$
            BEGIN
                IF NEW.ops LIKE '%%die%%' THEN
                    PERFORM pg_terminate_backend(pg_backend_pid());
                    PERFORM pg_sleep(5);
                END IF;
                RETURN NULL;
            END $$ LANGUAGE plpgsql""")
        conn.execute("CREATE CONSTRAINT TRIGGER die AFTER INSERT ON txns DEFERRABLE "
                     "INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION die_at_commit()")
        failure = yield self.assertFailure(
            self.store.commit([("set", "die", "1"), ("incr", "n", 1)]), StoreBusy)
        self.assertIn("lost during COMMIT", str(failure))
        self.assertIn("not in the database", str(failure))
        values = yield self.store.get_many(["die", "n"])
        self.assertEqual(values, {"die": None, "n": None})
        result = yield self.store.commit([("incr", "n", 1)])
        self.assertEqual(result.values, {"n": "1"})

    @defer.inlineCallbacks
    def test_a_commit_found_by_its_token_is_reported_committed(self):
        """
        The other outcome of the same resolution: the commit is in the
        database (the connection broke after it was applied).
        """
        yield self.store.commit([("set", "a", "1")])
        rows = self.raw().execute("SELECT token FROM txns").fetchall()
        token = rows[0][0]
        backend = self.store.backend
        result = yield self.store.pool.runWithConnection(
            lambda _: backend._resolve(self.store.pool, OSError("reset"), token, 0))
        self.assertEqual((result.txid, result.values), (1, {"a": "1"}))

    @defer.inlineCallbacks
    def test_outcome_unknown_while_the_database_is_unreachable(self):
        server = pg.own_server(self)
        store = Store(server.new_database(), reactor)
        store.startService()
        self.addCleanup(lambda: store.running and store.stopService())
        yield store.check()
        yield deferToThreadStop(server)
        backend = store.backend
        failure = yield self.assertFailure(
            store.pool.runWithConnection(
                lambda _: backend._resolve(store.pool, OSError("reset"), "tok", 0)),
            CommitOutcomeUnknown)
        self.assertIn("cannot be asked", str(failure))
        self.assertIn("commit token tok", str(failure))


def deferToThreadStop(server):
    from twisted.internet import threads

    return threads.deferToThread(server.stop, "immediate")


def deferToThreadStart(server):
    from twisted.internet import threads

    return threads.deferToThread(server.start)


class PostgresURLOptionTests(unittest.TestCase):
    """
    --db: a postgresql:// URL that cannot work is a usage error naming it,
    without its password; a path stays SQLite.
    """

    def check(self, url):
        from twisted.python import usage

        from twisted_graceful.tap import check_postgres_url

        with self.assertRaises(usage.UsageError) as e:
            check_postgres_url(url)
        return str(e.exception)

    def test_a_port_that_is_not_a_number(self):
        text = self.check("postgresql://app:s3cret@db:port/kv")
        self.assertIn("--db postgresql://app:***@db:port/kv", text)
        self.assertNotIn("s3cret", text)

    def test_no_database_name(self):
        self.assertIn("no database name", self.check("postgresql://app@db:5432/"))

    def test_no_host(self):
        self.assertIn("no host", self.check("postgresql:///kv"))

    def test_a_good_url_passes(self):
        from twisted_graceful.store import psycopg_unusable
        from twisted_graceful.tap import check_postgres_url

        if psycopg_unusable():
            raise unittest.SkipTest(psycopg_unusable())
        check_postgres_url("postgres://app:pw@db.internal:5432/kv")
        check_postgres_url("postgresql:///kv?host=/run/postgresql")

    def test_a_psycopg_that_cannot_connect_here_is_a_usage_error(self):
        """
        PyPy 7.3.11's ctypes cannot hold a weak reference in a py_object,
        which psycopg's pure-Python libpq wrapper needs for every connection
        (pypy/pypy#3882): said at start-up, not as a readiness failure.
        """
        import ctypes

        import psycopg

        def refuse(value):
            raise TypeError("cannot create weak reference to 'weakref' object")

        self.patch(psycopg.pq, "__impl__", "python")
        self.patch(ctypes, "py_object", refuse)
        text = self.check("postgresql://app:s3cret@db.internal:5432/kv")
        self.assertIn("--db postgresql://app:***@db.internal:5432/kv: psycopg", text)
        self.assertIn("pure-Python libpq wrapper cannot connect", text)
        self.assertIn("pypy/pypy#3882", text)
