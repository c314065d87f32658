"""
A usage error of C{twistd graceful} exits non-zero on every Twisted the
project supports: twistd before 26.10 printed it and exited 0
(L{twisted_graceful._twisted.exit_on_usage_error}).
"""

import io
import sys

from twisted.application import app
from twisted.python import usage
from twisted.trial import unittest

from twisted_graceful import _twisted, tap


class ServerOptions(usage.Options):
    """
    twistd's options as far as app.run sees them: a subcommand per plugin.
    """

    subCommands = [("graceful", None, tap.Options, "the plugin")]


class UsageErrorTests(unittest.TestCase):
    def run_twistd(self, *args):
        self.patch(sys, "argv", ["twistd", "graceful", *args])
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        ran = []
        try:
            app.run(ran.append, ServerOptions)
        except SystemExit as e:
            return e.code, out.getvalue(), ran
        return None, out.getvalue(), ran

    def test_twistd_before_26_10_exits_1(self):
        self.patch(_twisted, "TWISTD_EXITS_ON_USAGE_ERROR", False)
        code, out, ran = self.run_twistd("--port", "nonsense:x")
        self.assertEqual(code, 1)
        self.assertEqual(ran, [])
        self.assertIn("twistd graceful: --port 'nonsense:x': unsupported listener type "
                      "'nonsense'", out)
        self.assertIn("--drain-timeout=", out)  # the usage, as twistd prints it

    def test_on_any_twisted_a_usage_error_is_not_a_success(self):
        code, out, ran = self.run_twistd("--workers", "-3")
        self.assertNotIn(code, (None, 0))
        self.assertEqual(ran, [])
        self.assertIn("--workers", out.splitlines()[-1])

    def test_good_options_run(self):
        self.patch(_twisted, "TWISTD_EXITS_ON_USAGE_ERROR", False)
        # Every listener on a free port: the defaults (8025, 9090) may be taken
        # by a server running on this machine.
        code, _, ran = self.run_twistd("--port", "tcp:0:interface=127.0.0.1",
                                       "--txn-port", "tcp:0:interface=127.0.0.1",
                                       "--metrics-port", "tcp:0:interface=127.0.0.1")
        self.assertIsNone(code)
        self.assertEqual(len(ran), 1)

    def test_outside_twistd_the_error_is_raised(self):
        # The preflight (python -m twisted_graceful preflight) and tests parse
        # the options themselves: they get the UsageError, never an exit.
        self.patch(_twisted, "TWISTD_EXITS_ON_USAGE_ERROR", False)
        error = self.assertRaises(usage.UsageError, tap.Options().parseOptions,
                                  ["--port", "nonsense:x"])
        self.assertIn("unsupported listener type 'nonsense'", str(error))
