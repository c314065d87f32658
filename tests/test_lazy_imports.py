"""
What each kind of process imports (docs/design.md, fact 43): a master,
which serves nothing, must not import twisted.web, the metrics site, the
TLS or PostgreSQL code; a serving process imports what it serves and not
the code of listeners and databases it does not have; without a TLS
listener, no process imports pyOpenSSL. Each check runs twistd's own option
parsing and our makeService in a fresh interpreter and reads its
sys.modules.
"""

import json
import os
import subprocess
import sys

from twisted.trial import unittest

from tests.e2e import REPO

# Imported by the master: never.
MASTER_MUST_NOT_IMPORT = (
    "twisted.web",
    "prometheus_client.twisted",
    "psycopg",
    "twisted_graceful.http",
    "twisted_graceful.hello",
    "twisted_graceful.metrics",
    "twisted_graceful.service",
    "twisted_graceful.statuspage",
    "twisted_graceful.tls",
    "twisted_graceful.txn",
    "twisted_graceful.datagram",
)
# Imported by a serving process with no --tls-port and an SQLite --db: never.
SERVER_MUST_NOT_IMPORT = ("psycopg", "twisted_graceful.tls", "twisted_graceful.master")

# twistd as `twistd --nodaemon graceful ARGS` runs it (its own option
# parsing, plugin and all, inside app.run), up to the service being made;
# then every module loaded (not the ones made to fail: None in sys.modules).
SCRIPT = """
import json, sys
from twisted.application import app
from twisted.scripts.twistd import ServerOptions

def run_app(config):
    from twisted_graceful import tap
    service = tap.makeService(config.subOptions)
    print(json.dumps({"service": type(service).__name__,
                      "modules": sorted(n for n, m in sys.modules.items() if m is not None)}))

sys.argv = ["twistd", "--nodaemon", "graceful", *sys.argv[1:]]
app.run(run_app, ServerOptions)
"""
# Imported by a process with no TLS listener (fact 43): never.
TLS_MODULES = ("OpenSSL", "cryptography", "service_identity", "twisted.internet.ssl",
               "twisted.protocols.tls", "twisted_graceful.tls")


def imported(names, prefixes):
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


class LazyImportTests(unittest.TestCase):
    def run_tap(self, *args):
        """
        Parse C{args} and make the service in a new interpreter: the
        service's class and every module imported.
        """
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GRACEFUL_", "LISTEN_", "PROMETHEUS_MULTIPROC"))
               and k != "NOTIFY_SOCKET"}
        env["PYTHONPATH"] = REPO
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        listen = "tcp:0:interface=127.0.0.1"
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT, "--port", listen, "--txn-port", listen,
             "--metrics-port", listen, "--db", os.path.join(cwd, "db.sqlite3"), *args],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        doc = json.loads(result.stdout.splitlines()[-1])
        return doc["service"], doc["modules"]

    def test_master_imports_nothing_that_serves(self):
        service, modules = self.run_tap("--workers", "2")
        self.assertEqual(service, "MasterService")
        self.assertEqual(imported(modules, MASTER_MUST_NOT_IMPORT + TLS_MODULES), [])
        # What it does need, so that the list above is read from a real master.
        self.assertEqual(imported(modules, ("twisted_graceful.master_metrics",
                                            "twisted_graceful.master")),
                         ["twisted_graceful.master", "twisted_graceful.master_metrics"])

    def test_server_imports_what_it_serves_only(self):
        service, modules = self.run_tap("--workers", "0")
        self.assertEqual(service, "GracefulService")
        self.assertEqual(imported(modules, SERVER_MUST_NOT_IMPORT + TLS_MODULES), [])
        for needed in ("twisted.web.server", "twisted_graceful.http", "twisted_graceful.metrics",
                       "prometheus_client.twisted", "twisted_graceful.txn",
                       "twisted.internet.tcp", "twisted.internet.reactor"):
            self.assertIn(needed, modules)

    def tls_listener(self):
        from tests.certs import write_certificate

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        write_certificate(cert, key, "lazy.test")
        return ["--tls-port", f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1"]

    def test_server_with_tls_imports_tls(self):
        service, modules = self.run_tap("--workers", "0", *self.tls_listener())
        self.assertEqual(service, "GracefulService")
        for needed in ("twisted_graceful.tls", "OpenSSL", "twisted.internet.ssl"):
            self.assertIn(needed, modules)

    def test_master_with_tls_checks_the_certificate(self):
        # The master loads the certificate once, at its first start, to refuse
        # a bad one before any worker starts: it needs pyOpenSSL then.
        service, modules = self.run_tap("--workers", "1", *self.tls_listener())
        self.assertEqual(service, "MasterService")
        self.assertIn("OpenSSL", modules)
        serving = [p for p in MASTER_MUST_NOT_IMPORT if p != "twisted_graceful.tls"]
        self.assertEqual(imported(modules, serving), [])


class WithoutTLSTests(unittest.TestCase):
    """
    L{reactor_without_tls} outside twistd, or once too late, does nothing.
    """

    def test_only_under_twistd(self):
        from twisted_graceful._twisted import reactor_without_tls

        modules = {}
        self.assertFalse(reactor_without_tls(modules))  # a test is not twistd
        self.assertEqual(modules, {})

    def test_not_once_tls_is_imported(self):
        from twisted_graceful import _twisted

        self.patch(_twisted, "_parsed_by_twistd", lambda: True)
        modules = {"twisted.internet.tcp": object()}
        self.assertFalse(_twisted.reactor_without_tls(modules))
        self.assertNotIn("OpenSSL", modules)
        modules = {}
        self.assertTrue(_twisted.reactor_without_tls(modules))
        self.assertIsNone(modules["OpenSSL"])


class CompatibleNamesTests(unittest.TestCase):
    """
    The names that moved are still importable where they were.
    """

    def test_package_names_on_first_use(self):
        import twisted_graceful
        from twisted_graceful import http, listeners, service

        self.assertIs(twisted_graceful.GracefulSite, http.GracefulSite)
        self.assertIs(twisted_graceful.GracefulService, service.GracefulService)
        self.assertIs(twisted_graceful.ListenerError, listeners.ListenerError)
        self.assertIn("HTTPSelfTest", dir(twisted_graceful))
        for name in twisted_graceful.__all__:
            self.assertTrue(hasattr(twisted_graceful, name), name)
        self.assertRaises(AttributeError, getattr, twisted_graceful, "NoSuchName")

    def test_moved_names(self):
        from twisted_graceful import listeners, master_metrics, metrics, statuspage, tls
        from twisted_graceful.statusfile import StatusResource

        self.assertIs(StatusResource, statuspage.StatusResource)
        self.assertIs(tls.CertificateError, listeners.CertificateError)
        for name in ("MasterMetrics", "install_master", "master_directory", "use_multiprocess",
                     "MULTIPROC_ENV", "RELOAD_RESULTS"):
            self.assertIs(getattr(metrics, name), getattr(master_metrics, name), name)
