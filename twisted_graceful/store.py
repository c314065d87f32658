"""
The key/value store behind the transaction protocol: one SQLite file (standard
library C{sqlite3}) reached through L{twisted.enterprise.adbapi}, shared by the
old and the new generation while both run.

Nothing of a transaction touches the database before C{COMMIT}: the protocol
queues the writes, and L{Store.commit} applies them all in one SQLite
transaction taken with C{BEGIN IMMEDIATE} (the write lock), re-reading every
key it writes under that lock. Transactions are therefore serializable in the
order of their commits, whichever process runs them, and a transaction that
never reached C{COMMIT} (aborted, cut by a crash or at the drain deadline)
leaves no trace. Each commit also inserts one row into C{txns}, so a client
can check that every acknowledged C{txid} is there exactly once.
"""

import json
import os
import re
import sqlite3
import time

from twisted.application import service
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_INTEGER = re.compile(r"-?[0-9]{1,19}\Z")

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS kv (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS txns (
        txid INTEGER PRIMARY KEY AUTOINCREMENT,
        committed_at REAL NOT NULL,
        pid INTEGER NOT NULL,
        generation INTEGER,
        ops TEXT NOT NULL,
        result TEXT NOT NULL
    )""",
)


class TransactionFailed(Exception):
    """
    A transaction cannot be applied as it stands (an C{INCR} of a value that
    is not an integer, or one that would overflow); nothing of it was applied.
    """


class StoreBusy(Exception):
    """
    The database stayed locked (or failed) past the busy timeout; nothing of
    the transaction was applied and it may be retried.
    """


def parse_integer(text):
    """
    The 64-bit signed integer C{text} spells, or L{None}.
    """
    if not isinstance(text, str) or not _INTEGER.match(text):
        return None
    number = int(text)
    return number if INT64_MIN <= number <= INT64_MAX else None


def apply_ops(ops, values):
    """
    Apply C{ops} (C{("set", key, value)}, C{("incr", key, n)}, C{("del",
    key)}) to C{values} (key -> value or L{None} for absent) in order.

    @return: a new dict: every key of C{values} and C{ops} -> its final value
        (L{None}: absent).
    @raise TransactionFailed: an C{INCR} of a value that is not an integer or
        a result outside 64 bits.
    """
    result = dict(values)
    for op in ops:
        kind, key = op[0], op[1]
        if kind == "set":
            result[key] = op[2]
        elif kind == "del":
            result[key] = None
        elif kind == "incr":
            current = result.get(key)
            number = 0 if current is None else parse_integer(current)
            if number is None:
                raise TransactionFailed(f"{key} is not an integer")
            total = number + op[2]
            if not INT64_MIN <= total <= INT64_MAX:
                raise TransactionFailed(f"INCR {key} would overflow a 64-bit integer")
            result[key] = str(total)
        else:
            raise ValueError(f"unknown operation {kind!r}")
    return result


def keys_of(ops):
    """
    The keys C{ops} write, in the order they are first written.
    """
    seen = {}
    for op in ops:
        seen.setdefault(op[1], None)
    return list(seen)


class CommitResult:
    def __init__(self, txid, values):
        self.txid = txid
        self.values = values  # key -> final value (None: deleted), in write order


class Store(service.Service):
    """
    The SQLite file at C{path}, in WAL mode, through an adbapi pool that
    lives from C{startService} to C{stopService}. Run it as a child of the
    L{GracefulService} so that it stops only once every connection has
    drained.
    """

    log = Logger()

    def __init__(self, path, reactor=None, pool_size=3, busy_timeout=5.0, pid=None,
                 generation=lambda: None):
        if reactor is None:
            from twisted.internet import reactor
        self.path = os.path.abspath(path)
        self.reactor = reactor
        self.pool_size = pool_size
        self.busy_timeout = busy_timeout
        self._pid = pid
        self._generation = generation
        self.pool = None
        self._in_flight = 0
        self._idle_waiters = []

    # --- lifetime -------------------------------------------------------
    def startService(self):
        service.Service.startService(self)
        self.pool = adbapi.ConnectionPool(
            "sqlite3", self.path,
            check_same_thread=False,  # the pool closes connections from the reactor thread
            isolation_level=None,  # no implicit transactions: we say BEGIN IMMEDIATE ourselves
            timeout=self.busy_timeout,
            cp_min=1, cp_max=self.pool_size, cp_openfun=self._configure,
            cp_reactor=self.reactor, cp_noisy=False,
        )
        self.pool.start()
        self.log.info("Store: SQLite {path} (WAL mode)", path=self.path)

    def stopService(self):
        """
        Let the interactions in flight finish (their replies still go out),
        then close the pool.
        """
        service.Service.stopService(self)
        pool, self.pool = self.pool, None
        if pool is None:
            return None
        if not self._in_flight:
            pool.close()
            return None
        d = defer.Deferred()
        self._idle_waiters.append(d)
        return d.addCallback(lambda _: pool.close())

    def _configure(self, conn):
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"{self.path}: cannot use WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = NORMAL")
        for statement in SCHEMA:
            conn.execute(statement)

    def _run(self, interaction, *args):
        if self.pool is None:
            return defer.fail(StoreBusy(f"the store {self.path} is not open"))
        self._in_flight += 1
        d = self.pool.runInteraction(interaction, *args)

        def done(result):
            self._in_flight -= 1
            if not self._in_flight:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    self.reactor.callLater(0, waiter.callback, None)
            if isinstance(getattr(result, "value", None), sqlite3.Error):
                raise StoreBusy(f"{result.value}")
            return result

        return d.addBoth(done)

    # --- reads ----------------------------------------------------------
    def get(self, key):
        """
        Fire with the committed value of C{key}, or L{None}.
        """
        return self.get_many([key]).addCallback(lambda values: values[key])

    def get_many(self, keys):
        """
        Fire with key -> committed value (L{None}: absent) for C{keys}.
        """
        return self._run(_read, list(keys))

    def check(self):
        """
        Prove the store works end to end (for the readiness check): a read
        through the pool. Fires with the number of committed transactions.
        """
        return self._run(lambda txn: txn.execute("SELECT count(*) FROM txns").fetchone()[0])

    def transactions(self):
        """
        Every committed transaction: a list of dicts, oldest first (for tests
        and operators).
        """

        def read(txn):
            rows = txn.execute(
                "SELECT txid, committed_at, pid, generation, ops, result FROM txns ORDER BY txid"
            ).fetchall()
            return [
                {"txid": r[0], "committed_at": r[1], "pid": r[2], "generation": r[3],
                 "ops": [tuple(op) for op in json.loads(r[4])], "result": json.loads(r[5])}
                for r in rows
            ]

        return self._run(read)

    # --- writes ---------------------------------------------------------
    def commit(self, ops):
        """
        Apply C{ops} atomically: all of them or, on any error, none.

        @return: a Deferred firing with a L{CommitResult}, or failing with
            L{TransactionFailed} (the transaction as written cannot apply) or
            L{StoreBusy} (try again later).
        """
        ops = [tuple(op) for op in ops]
        if not ops:
            raise ValueError("a commit needs at least one write")
        pid = os.getpid() if self._pid is None else self._pid
        return self._run(_commit, ops, pid, self._generation())


def _read(txn, keys):
    values = dict.fromkeys(keys)
    for i in range(0, len(keys), 500):
        chunk = keys[i:i + 500]
        marks = ",".join("?" * len(chunk))
        for key, value in txn.execute(f"SELECT key, value FROM kv WHERE key IN ({marks})", chunk):
            values[key] = value
    return values


def _commit(txn, ops, pid, generation):
    # The write lock first, then the reads: no other writer (in this process
    # or the other generation) can change these keys before we commit.
    txn.execute("BEGIN IMMEDIATE")
    keys = keys_of(ops)
    values = apply_ops(ops, _read(txn, keys))
    final = {key: values[key] for key in keys}
    for key, value in final.items():
        if value is None:
            txn.execute("DELETE FROM kv WHERE key = ?", (key,))
        else:
            txn.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
    txn.execute(
        "INSERT INTO txns (committed_at, pid, generation, ops, result) VALUES (?, ?, ?, ?, ?)",
        (time.time(), pid, generation, json.dumps(ops), json.dumps(final)),
    )
    return CommitResult(txn.lastrowid, final)
