"""
GracefulService and Inheritance without a reactor running: what a generation
takes from its environment.
"""

import os
import socket

from twisted.trial import unittest

from twisted_graceful.handoff import HandoffError
from twisted_graceful.listeners import address_mismatch, parse_listen_description
from twisted_graceful.inherit import Inheritance
from twisted_graceful.lineage import Lineage


class InheritanceTests(unittest.SynchronousTestCase):
    def listening(self, host="127.0.0.1"):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind((host, 0))
        sock.listen()
        return sock

    def handoff_env(self, sock):
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        fd = os.dup(sock.fileno())
        lineage = Lineage.create()
        self.addCleanup(lineage.close)
        return {"GRACEFUL_LISTENERS": f"http={fd}", "GRACEFUL_READY_FD": str(write),
                "GRACEFUL_GENERATION": "2", "GRACEFUL_PARENT_PID": "1",
                "GRACEFUL_LINEAGE_FD": str(lineage.fileno())}

    def test_inherits_the_same_address(self):
        sock = self.listening()
        port = sock.getsockname()[1]
        spec = parse_listen_description(f"tcp:{port}:interface=127.0.0.1")
        env = self.handoff_env(sock)
        inh = Inheritance.acquire({"http": spec}, env)
        self.addCleanup(inh.sockets["http"].close)
        self.addCleanup(os.close, inh.ready_fd)
        self.assertEqual(inh.sockets["http"].getsockname()[1], port)
        self.assertEqual(inh.generation, 2)
        self.assertNotIn("GRACEFUL_LISTENERS", env)  # not passed on to what we start

    def test_an_upgrade_cannot_move_a_listener(self):
        sock = self.listening()
        other = self.listening()  # its port is in use, so nobody else takes it
        spec = parse_listen_description(f"tcp:{other.getsockname()[1]}:interface=127.0.0.1")
        env = self.handoff_env(sock)
        error = self.assertRaises(HandoffError, Inheritance.acquire, {"http": spec}, env,
                                  options={"http": "--port"})
        self.assertIn("--port tcp:", str(error))
        self.assertIn(f"listens on tcp:127.0.0.1:{sock.getsockname()[1]}", str(error))
        self.assertIn("restart the server to change its address", str(error))

    def test_port_zero_matches_any_port(self):
        sock = self.listening()
        self.assertIsNone(address_mismatch(
            parse_listen_description("tcp:0:interface=127.0.0.1"), sock))

    def test_other_interface_is_a_mismatch(self):
        sock = self.listening()
        port = sock.getsockname()[1]
        self.assertEqual(
            address_mismatch(parse_listen_description(f"tcp:{port}"), sock),
            f"tcp:127.0.0.1:{port}")
