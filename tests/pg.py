"""
A real PostgreSQL server for tests: C{initdb} and C{pg_ctl} (Debian package
C{postgresql}) in a temporary directory, as an unprivileged user (PostgreSQL
refuses to run as root), listening on a free loopback port only.

One server is shared by the tests of a trial process (each test gets a
database of its own); a test that stops or restarts its server starts its own.
"""

import atexit
import glob
import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile

from tests.e2e import free_port, unless_required

_counter = itertools.count(1)
_shared = None


def _version_key(path):
    m = re.search(r"/postgresql/(\d+)/", path)
    return int(m.group(1)) if m else 0


def find_binary(name):
    """
    C{name} from PostgreSQL's server binaries: on PATH, else in Debian's
    C{/usr/lib/postgresql/<version>/bin} (the newest), else L{None}.
    """
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_version_key)
    if found:
        return found[-1]
    return shutil.which(name)


def _server_user():
    """
    The user to run the server as: ourselves unless we are root, then the
    C{postgres} account the Debian package creates (or C{nobody}).
    """
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def unavailable():
    return unless_required(_unavailable())


def _unavailable():
    """
    Why the PostgreSQL tests cannot run here, or L{None}.
    """
    missing = [n for n in ("initdb", "pg_ctl") if find_binary(n) is None]
    if missing:
        return (f"PostgreSQL server binaries not found ({', '.join(missing)}); "
                f"apt-get install postgresql (.ci/run does)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed (pip install 'psycopg[binary]')"
    from twisted_graceful.store import psycopg_unusable

    unusable = psycopg_unusable()
    if unusable:
        return unusable
    if os.geteuid() == 0:
        if _server_user() is None:
            return "running as root and there is no unprivileged user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing"
    return None


class PostgresServer:
    """
    One PostgreSQL cluster in its own temporary directory.
    """

    user = "graceful"

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="graceful-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        self.account = _server_user()
        if self.account is not None:
            os.chown(self.dir, self.account.pw_uid, self.account.pw_gid)
        self.port = None
        self.running = False

    def _run(self, *command, timeout=120):
        command = list(command)
        if self.account is not None:
            command = ["runuser", "-u", self.account.pw_name, "--"] + command
        done = subprocess.run(command, cwd=self.dir, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}{self.log_tail()}")
        return done

    def log_tail(self, n=20):
        try:
            with open(self.log) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def init(self):
        self._run(find_binary("initdb"), "-D", self.data, "-U", self.user, "--auth=trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        return self

    def start(self, port=None):
        """
        Start (or restart, on the same port) and wait until it accepts
        connections (C{pg_ctl -w}).
        """
        attempts = 1 if port or self.port else 3
        for attempt in range(attempts):
            self.port = port or self.port or free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} "
                       f"-c unix_socket_directories={self.dir} -c fsync=off "
                       f"-c full_page_writes=off "
                       f"-c max_connections=200")
            try:
                self._run(find_binary("pg_ctl"), "-D", self.data, "-l", self.log, "-o",
                          options, "-w", "-t", "60", "start")
                break
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                self.port = None  # another process took the port meanwhile
        self.running = True
        return self

    def stop(self, mode="fast"):
        if self.running:
            self._run(find_binary("pg_ctl"), "-D", self.data, "-m", mode, "-w", "-t", "60",
                      "stop")
            self.running = False

    def destroy(self):
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, dbname="postgres"):
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname="postgres", **kwargs):
        import psycopg

        return psycopg.connect(self.url(dbname), connect_timeout=10, **kwargs)

    def new_database(self):
        """
        A fresh, empty database on this server; its URL.
        """
        name = f"t{os.getpid()}_{next(_counter)}"
        with self.connect(autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def shared_server():
    """
    The trial process's shared server (started on first use, removed at exit).
    """
    global _shared
    if _shared is None:
        server = PostgresServer()
        try:
            server.init().start()
        except BaseException:
            server.destroy()
            raise
        atexit.register(server.destroy)
        _shared = server
    return _shared


def own_server(testcase):
    """
    A server of the test's own (for a test that stops or restarts it).
    """
    server = PostgresServer()
    testcase.addCleanup(server.destroy)
    return server.init().start()


def database_url(testcase):
    """
    A fresh database on the shared server, or skip the test with the reason.
    """
    from twisted.trial.unittest import SkipTest

    reason = unavailable()
    if reason:
        raise SkipTest(reason)
    return shared_server().new_database()


def rows(url):
    """
    (kv dict, list of txns rows as dicts) read straight from the database.
    """
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as conn:
        kv = dict(conn.execute("SELECT key, value FROM kv").fetchall())
        txns = [
            {"txid": r[0], "pid": r[1], "generation": r[2], "ops": _json(r[3])}
            for r in conn.execute("SELECT txid, pid, generation, ops FROM txns ORDER BY txid")
        ]
    return kv, txns


def _json(text):
    import json

    return json.loads(text)
