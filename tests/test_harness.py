"""
Unit tests of the end-to-end harness itself (L{tests.e2e}): what it starts
does not depend on how the suite itself was started.
"""

import subprocess
import sys

from twisted.trial import unittest

from tests.e2e import REPO

# A parent that ignores SIGINT and SIGQUIT, as a background job of a script
# does, starts a Python child (with or without the trampoline) that reports
# its own SIGINT and SIGQUIT handlers.
PARENT = """
import signal, subprocess, sys
sys.path.insert(0, sys.argv[1])
from tests.e2e import with_default_signals
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGQUIT, signal.SIG_IGN)
child = [sys.executable, "-c",
         "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
         "signal.getsignal(signal.SIGQUIT) == signal.SIG_DFL)"]
argv = with_default_signals(child) if sys.argv[2] == "trampoline" else child
sys.stdout.write(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
"""


class DefaultSignalsTests(unittest.TestCase):
    def child_handlers(self, how):
        done = subprocess.run([sys.executable, "-c", PARENT, REPO, how],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.split()

    def test_what_the_suite_ignores_is_at_its_default_in_a_server(self):
        self.assertEqual(self.child_handlers("trampoline"), ["True", "True"])

    def test_without_it_a_child_would_inherit_the_ignored_signals(self):
        # Why the trampoline exists: an ignored signal survives exec.
        self.assertEqual(self.child_handlers("direct"), ["False", "False"])
