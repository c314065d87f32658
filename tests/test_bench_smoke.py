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

    def test_start_times_run_without_peers(self):
        # One round of `--only start`: ours only (the test suite never
        # installs gunicorn: that is --peers).
        out = os.path.abspath(self.mktemp())
        result = subprocess.run(
            [sys.executable, "-m", "bench.workers", "--only", "start", "--rounds", "1",
             "--start-upgrades", "1", "--json", out],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(out) as f:
            start = json.load(f)["start"]
        self.assertNotIn("gunicorn", start)
        for n in (1, 2):
            ours = start["ours"][f"w{n}"]
            self.assertEqual(ours["samples"], {"fresh": 1, "upgrades": 1})
            self.assertGreater(ours["fresh_first_answer_s"], 0)
            self.assertGreaterEqual(ours["signal_to_every_new_answered_s"],
                                    ours["signal_to_first_new_answer_s"])
            self.assertIn("ours_sighup_every / ours_fresh", start["ratios"][f"w{n}"])
        self.assertIn("| ours | 2 |", result.stdout)

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
