"""
Numbers that one generation hands the next through the environment are
bounded before use: an absurd value is ignored or refused in one line, never
a traceback.
"""

from twisted.trial import unittest

from twisted_graceful import metrics


class CarriedReloadCountsTests(unittest.TestCase):
    def test_counts(self):
        self.assertEqual(metrics._parse_reloads("ok=2,failed=1,timeout=0"),
                         {"ok": 2, "failed": 1, "timeout": 0})

    def test_absurd_count_is_ignored(self):
        # isdigit() took 5000 digits, and int() of them raised ValueError.
        self.assertEqual(metrics._parse_reloads("ok=" + "9" * 5000 + ",failed=1"),
                         {"failed": 1})
