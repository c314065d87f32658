"""
The reload benchmark's smoke run, so the harness cannot rot: 3 upgrades
under HTTP (keep-alive, fresh, POST) and transaction load.
"""

import json
import os
import subprocess
import sys

from twisted.trial import unittest

from tests.e2e import REPO


class BenchSmokeTests(unittest.TestCase):
    def test_smoke_run_counts_everything_and_loses_nothing(self):
        out = os.path.abspath(self.mktemp())
        result = subprocess.run(
            [sys.executable, "-m", "bench.reload", "--smoke", "--json", out],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(out) as f:
            report = json.load(f)
        (handover,) = report["strategies"]
        self.assertEqual(handover["strategy"], "handover")
        self.assertEqual(handover["upgrades"], 3)
        for kind in ("keepalive", "fresh", "post", "txn"):
            self.assertGreater(handover["done"].get(kind, 0), 0, kind)
        self.assertEqual(handover["failed_total"], 0, handover["failure_examples"])
        txn = handover["txn_check"]
        self.assertEqual(txn["acknowledged"], txn["in_db"])
        self.assertEqual(txn["lost"], 0)
        self.assertEqual(handover["post_check"]["acknowledged"], handover["post_check"]["applied"])
        self.assertEqual(len(handover["generations"]), 4)
        self.assertIn("| handover | 3 |", result.stdout)


class ChannelInstructionsTests(unittest.SynchronousTestCase):
    """
    bench.channel_instructions' workload, without callgrind: every site it
    compares answers every request, on new connections and on one.
    """

    def test_every_site_answers_every_request(self):
        from bench import channel_instructions

        for kind in channel_instructions.SITES:
            for mode in channel_instructions.MODES:
                channel_instructions.serve(kind, mode, 3)  # SystemExit if one is not answered
