"""
The store under faults: the database's file removed or replaced while in use,
and a database this user cannot write. Permission tests run as an unprivileged
user (root ignores file modes, docs/design.md fact 22): in a forked child that
drops to C{nobody}.
"""

import os
import pickle
import shutil
import sqlite3
import traceback

from twisted.internet import defer, reactor
from twisted.python import usage
from twisted.trial import unittest

from twisted_graceful import store as store_module
from twisted_graceful import tap  # imported here: nobody cannot read site-packages
from twisted_graceful.store import Store, StoreBusy

from tests.e2e import short_temp_dir

NOBODY = 65534


def as_unprivileged(function, *args):
    """
    Run C{function(*args)} in a forked child as an unprivileged user (drop
    to nobody if we are root) and return what it returns; raise with the
    child's traceback if it raised.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into trial
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            result = ("ok", function(*args))
        except BaseException:
            result = ("error", traceback.format_exc())
        try:
            data = pickle.dumps(result)
        except Exception:
            data = pickle.dumps(("error", repr(result)))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind != "ok":
        raise AssertionError("the unprivileged child failed:\n" + value)
    return value


def directory_for_nobody(testcase):
    # Not under _trial_temp: mktemp's directories are 0700, closed to nobody.
    path = short_temp_dir(testcase)
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
    return path


class SyncPool:
    """
    adbapi's runInteraction on one real connection, synchronously (a forked
    child cannot run the reactor): commit on success, roll back on error.
    """

    def __init__(self, path, openfun):
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=1)
        openfun(self.conn)

    def runInteraction(self, interaction, *args):
        try:
            result = interaction(self.conn.cursor(), *args)
        except BaseException:
            if self.conn.in_transaction:
                self.conn.rollback()
            return defer.fail()
        if self.conn.in_transaction:
            self.conn.commit()
        return defer.succeed(result)


def outcome(d):
    results = []
    d.addBoth(results.append)
    (result,) = results
    if isinstance(result, Exception) or hasattr(result, "value"):
        error = getattr(result, "value", result)
        return type(error).__name__, str(error)
    return "ok", result


def make_read_only_database(directory):
    """
    As an unprivileged user: a database with one commit, then chmod 444 (the
    user still owns it), and what the store makes of it.
    """
    path = os.path.join(directory, "db.sqlite3")
    writer = Store(path, reactor, busy_timeout=1)
    writer.pool = SyncPool(path, writer.backend._configure)
    first = outcome(writer.commit([("set", "a", "1")]))
    writer.pool.conn.close()
    os.chmod(path, 0o444)
    store = Store(path, reactor, busy_timeout=1)
    store.pool = SyncPool(path, store.backend._configure)
    return {
        "first": first,
        "check": outcome(store.check()),
        "commit": outcome(store.commit([("set", "a", "2")])),
        "read": outcome(store.get("a")),
        "unusable": store.unusable() if hasattr(store, "unusable") else None,
    }


class ReadOnlyDatabaseTests(unittest.TestCase):
    def test_read_only_database_fails_the_readiness_check(self):
        found = as_unprivileged(make_read_only_database, directory_for_nobody(self))
        self.assertEqual(found["first"][0], "ok")
        self.assertEqual(found["read"], ("ok", "1"))  # reading still works...
        # ...but the readiness check proves the store can write.
        self.assertEqual(found["check"][0], "StoreUnusable", found)
        self.assertIn("readonly", found["check"][1])

    def test_read_only_database_is_a_permanent_error_not_busy(self):
        found = as_unprivileged(make_read_only_database, directory_for_nobody(self))
        self.assertEqual(found["commit"][0], "StoreUnusable", found)
        self.assertIn("readonly", found["commit"][1])
        self.assertIn("readonly", found["unusable"])

    def test_start_up_names_the_path_and_the_reason_at_once(self):
        directory = directory_for_nobody(self)
        as_unprivileged(make_read_only_database, directory)
        path = os.path.join(directory, "db.sqlite3")

        def parse():
            try:
                tap.Options().parseOptions(
                    ["--db", path, "--port", "tcp:0:interface=127.0.0.1",
                     "--txn-port", "tcp:0:interface=127.0.0.1",
                     "--metrics-port", "tcp:0:interface=127.0.0.1"])
            except usage.UsageError as e:
                return str(e)
            return None

        message = as_unprivileged(parse)
        self.assertIsNotNone(message)
        self.assertIn(path, message)
        self.assertIn("permission denied", message.lower())
        self.assertEqual(message.count("\n"), 0)

    def test_unwritable_directory_is_named_at_start_up(self):
        directory = directory_for_nobody(self)
        path = os.path.join(directory, "db.sqlite3")

        def check():
            os.chmod(directory, 0o555)
            return store_module.open_problem(path)

        message = as_unprivileged(check)
        self.assertIn(directory, message)
        self.assertIn("permission denied", message.lower())

    def test_writable_database_has_no_problem(self):
        directory = directory_for_nobody(self)
        path = os.path.join(directory, "db.sqlite3")
        self.assertIsNone(as_unprivileged(store_module.open_problem, path))


class FlakyWalSwitch:
    """
    A connection whose switch to WAL mode meets "database is locked" at once
    the first C{failures} times, as a fresh database opened by several
    connections at the same moment does (SQLite does not wait for that lock).
    """

    def __init__(self, failures):
        self.failures = failures
        self.statements = []

    def execute(self, statement, *args):
        self.statements.append(statement)
        if "journal_mode" in statement:
            if self.failures:
                self.failures -= 1
                raise sqlite3.OperationalError("database is locked")
            return FakeCursor([("wal",)])
        return FakeCursor([])


class FakeCursor:
    def __init__(self, rows):
        self.rows = rows

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def fetchall(self):
        return list(self.rows)


class ConfigureTests(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(short_temp_dir(self), "db.sqlite3")
        sqlite3.connect(self.path).close()

    def test_wal_switch_that_meets_a_lock_is_retried(self):
        store = Store(self.path, reactor, busy_timeout=5.0)
        conn = FlakyWalSwitch(failures=3)
        store.backend._configure(conn)
        self.assertEqual(sum("journal_mode" in s for s in conn.statements), 4)

    def test_wal_switch_gives_up_after_the_busy_timeout(self):
        store = Store(self.path, reactor, busy_timeout=0.05)
        self.assertRaises(sqlite3.OperationalError, store.backend._configure,
                          FlakyWalSwitch(failures=10 ** 9))


class LostDatabaseTests(unittest.TestCase):
    """
    SQLite keeps writing into a file that was unlinked: a commit there would
    be acknowledged and lost with the process.
    """

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "db.sqlite3")
        self.store = Store(self.path, reactor, generation=lambda: 1)
        self.store.startService()
        self.addCleanup(lambda: self.store.running and self.store.stopService())

    def unusable_error(self):
        return getattr(store_module, "StoreUnusable", StoreBusy)

    @defer.inlineCallbacks
    def test_commit_after_the_directory_is_removed_is_refused(self):
        result = yield self.store.commit([("set", "a", "1")])
        self.assertEqual(result.txid, 1)
        shutil.rmtree(self.directory)
        error = yield self.assertFailure(self.store.commit([("set", "a", "2")]),
                                         self.unusable_error())
        self.assertIn(self.path, str(error))
        self.assertIn("gone", str(error))
        self.assertIn("gone", self.store.unusable())
        # Recreating the directory changes nothing: that is not our file.
        os.makedirs(self.directory)
        yield self.assertFailure(self.store.commit([("set", "a", "3")]),
                                 self.unusable_error())
        yield self.assertFailure(self.store.check(), self.unusable_error())
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_a_new_connection_failing_on_a_lost_file_says_the_file_is_gone(self):
        # adbapi runs an interaction on whichever pool thread is free: one
        # that opens a new connection fails in sqlite3.connect ("unable to
        # open database file") before any check of ours runs.
        yield self.store.commit([("set", "a", "1")])
        shutil.rmtree(self.directory)

        def opening(txn):
            raise sqlite3.OperationalError("unable to open database file")

        error = yield self.assertFailure(self.store._run(opening), self.unusable_error())
        self.assertIn("gone", str(error))

    @defer.inlineCallbacks
    def test_commit_after_the_file_is_replaced_is_refused(self):
        yield self.store.commit([("set", "a", "1")])
        os.rename(self.path, self.path + ".moved")
        other = sqlite3.connect(self.path)
        other.execute("CREATE TABLE t (x)")
        other.commit()
        other.close()
        error = yield self.assertFailure(self.store.commit([("set", "a", "2")]),
                                         self.unusable_error())
        self.assertIn("replaced", str(error))
        self.assertIn("replaced", self.store.unusable())

    @defer.inlineCallbacks
    def test_healthy_store_is_usable(self):
        yield self.store.commit([("set", "a", "1")])
        self.assertIsNone(self.store.unusable())


class OpenProblemTests(unittest.TestCase):
    def test_nothing_is_created_by_the_check(self):
        # The check runs for every start, a preflight included: it creates
        # no database.
        directory = short_temp_dir(self)
        path = os.path.join(directory, "db.sqlite3")
        self.assertIsNone(store_module.open_problem(path))
        self.assertEqual(os.listdir(directory), [])

    def test_file_that_is_not_a_database(self):
        path = os.path.join(short_temp_dir(self), "db.sqlite3")
        with open(path, "w") as f:
            f.write("not a database, " * 100)
        message = store_module.open_problem(path)
        self.assertIn(path, message)
        self.assertIn("not a database", message)
