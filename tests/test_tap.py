"""
The defaults of C{twistd graceful} and of the shipped unit files: nothing that
writes listens beyond loopback unless asked to, and request sizes are bounded.
"""

import ipaddress
import os
import re

from twisted.python import usage
from twisted.trial import unittest

from twisted_graceful import tap
from twisted_graceful.listeners import parse_listen_description

from tests.e2e import REPO

UNITS = os.path.join(REPO, "contrib", "systemd")


def is_loopback(host):
    return ipaddress.ip_address(host.strip("[]")).is_loopback


class DefaultsTests(unittest.TestCase):
    def setUp(self):
        self.options = tap.Options()

    def test_transaction_protocol_listens_on_loopback(self):
        spec = parse_listen_description(self.options["txn-port"], "--txn-port")
        self.assertEqual((spec.kind, spec.port), ("tcp", 8025))
        self.assertTrue(is_loopback(spec.host), spec)

    def test_metrics_listen_on_loopback(self):
        spec = parse_listen_description(self.options["metrics-port"], "--metrics-port")
        self.assertTrue(is_loopback(spec.host), spec)

    def test_remote_writes_are_off(self):
        self.assertFalse(self.options["allow-remote-writes"])

    def test_request_limits(self):
        self.assertEqual(self.options["max-body"], 64 * 1024)
        self.assertEqual(self.options["header-timeout"], 10.0)

    def test_limits_must_be_positive(self):
        checks = {p[0]: p[4] for p in self.options.optParameters if len(p) > 4}
        for option in ("max-body", "header-timeout"):
            for value in ("0", "-1", "lots"):
                error = self.assertRaises(usage.UsageError, checks[option], value)
                self.assertIn(f"--{option}", str(error))


class UnitFileTests(unittest.TestCase):
    """
    The shipped systemd units follow the same defaults.
    """

    def read(self, name):
        with open(os.path.join(UNITS, name)) as f:
            return f.read()

    def test_txn_socket_is_loopback(self):
        listens = re.findall(r"^ListenStream=(.*)$", self.read("graceful-txn.socket"), re.M)
        self.assertTrue(listens)
        for listen in listens:
            host = listen.rsplit(":", 1)[0]
            self.assertTrue(is_loopback(host), listen)

    def test_bound_service_txn_port_is_loopback(self):
        text = self.read("graceful-bound.service").replace("\\\n", " ")
        m = re.search(r"--txn-port\s+(\S+)", text)
        self.assertIsNotNone(m)
        spec = parse_listen_description(m.group(1), "--txn-port")
        self.assertTrue(is_loopback(spec.host), m.group(1))

    def test_no_unit_opens_remote_writes(self):
        for name in os.listdir(UNITS):
            lines = [line for line in self.read(name).splitlines()
                     if not line.lstrip().startswith("#")]
            self.assertNotIn("--allow-remote-writes", "\n".join(lines))
