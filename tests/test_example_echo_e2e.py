"""
The example echo server (examples/echo/echo.tac), a real twistd: clients
send messages in a loop while it upgrades itself with SIGHUP; every message
gets its echo, the ones a draining generation turned away (421) are sent
again, and none fails.
"""

import os
import signal
import socket
import threading
import time

from twisted.trial import unittest

from tests.e2e import REPO, ServerProcess

TAC = os.path.join(REPO, "examples", "echo", "echo.tac")
CLIENTS = 4
UPGRADES = 3
LOOP_SECONDS = 150  # the most the clients run, whatever happens
PAUSE = 0.005  # between two messages of a client: a load that leaves the machine usable
MAX_MESSAGES = int(LOOP_SECONDS / PAUSE)  # per client


class EchoClient(threading.Thread):
    """
    Sends numbered messages of a few lines, one after the other, until told
    to stop (or C{LOOP_SECONDS}, or C{MAX_MESSAGES}). A message is done when
    its 250 comes with every line echoed; a 421 before it means "send it
    again elsewhere" (a retry); anything else (a reset, a close without 421,
    a wrong echo) is a failure.
    """

    def __init__(self, port, number):
        super().__init__(daemon=True)
        self.port = port
        self.number = number
        self.stop = threading.Event()
        self.done = 0
        self.retries = 0
        self.failures = []
        self.answered_by = {}  # pid -> messages it answered

    def run(self):
        deadline = time.monotonic() + LOOP_SECONDS
        message, sock, reader = 0, None, None
        while not self.stop.is_set() and time.monotonic() < deadline and message < MAX_MESSAGES:
            lines = [f"client {self.number} message {message} line {i}" for i in range(3)]
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                    reader = sock.makefile("rb")
                    greeting = reader.readline().decode()
                    if greeting.startswith("421 "):  # accepted by a generation on its way out
                        self.retries += 1
                        sock, reader = self._close(sock, reader)
                        continue
                    if not greeting.startswith("220 "):
                        raise AssertionError(f"greeting {greeting!r}")
                sock.sendall(("\n".join(lines) + "\n.\n").encode())
                echoed = []
                while True:
                    answer = reader.readline().decode()
                    if answer.startswith("> "):
                        echoed.append(answer[2:].rstrip("\n"))
                    elif answer.startswith("250 "):
                        if echoed != lines:
                            raise AssertionError(f"echoed {echoed!r}, sent {lines!r}")
                        pid = int(answer.split(" pid ")[1].split()[0])
                        self.answered_by[pid] = self.answered_by.get(pid, 0) + 1
                        self.done += 1
                        message += 1
                        self.stop.wait(PAUSE)
                        break
                    elif answer.startswith("421 "):
                        # The server closed at a boundary: the message this
                        # 421 came before (if any) was not answered; resend.
                        self.retries += 1
                        sock, reader = self._close(sock, reader)
                        break
                    else:
                        raise AssertionError(f"answer {answer!r} to message {message}")
                else:
                    continue
            except (OSError, AssertionError) as e:
                self.failures.append(f"client {self.number} message {message}: {e!r}")
                sock, reader = self._close(sock, reader)
        self._close(sock, reader)

    def _close(self, sock, reader):
        if reader is not None:
            reader.close()
        if sock is not None:
            sock.close()
        return None, None


class EchoExampleUpgradeTests(unittest.TestCase):
    timeout = 240

    def test_upgrades_under_a_client_loop_with_no_failure(self):
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        env = dict(os.environ, ECHO_LISTEN="tcp:0:interface=127.0.0.1",
                   ECHO_PIDFILE=os.path.join(cwd, "twistd.pid"))
        server = ServerProcess(self, ["--python", TAC], cwd=cwd, env=env).start()
        pid, ports = server.wait_listening(1)
        port = ports["echo"]
        clients = [EchoClient(port, n) for n in range(CLIENTS)]
        for client in clients:
            client.start()
        self.addCleanup(self._stop, clients)
        served_by = [pid]
        for generation in range(1, UPGRADES + 1):
            # Each generation answers messages before it is upgraded.
            self._wait_answered_by(clients, served_by[-1], 50)
            server.signal(served_by[-1], signal.SIGHUP)
            served_by.append(server.wait_handover(generation))
            self.assertEqual(server.wait_pidfile(served_by[-1]), served_by[-1])
            server.wait_gone(served_by[-2])
        self._wait_answered_by(clients, served_by[-1], 50)
        self._stop(clients)
        failures = [f for c in clients for f in c.failures]
        self.assertEqual(failures, [])
        answered_by = set().union(*(c.answered_by for c in clients))
        self.assertEqual(answered_by, set(served_by))
        # Every client went through every upgrade (none stopped early), and
        # was turned away at least once by each draining generation: its
        # connection was open when the drain began.
        for client in clients:
            self.assertIn(served_by[-1], client.answered_by, f"client {client.number}")
            self.assertGreaterEqual(client.retries, UPGRADES, f"client {client.number}")
        server.signal(served_by[-1], signal.SIGTERM)
        server.wait_all_exited()

    def _wait_answered_by(self, clients, pid, count, timeout=60):
        deadline = time.monotonic() + timeout
        while sum(c.answered_by.get(pid, 0) for c in clients) < count:
            failures = [f for c in clients for f in c.failures]
            if failures or time.monotonic() > deadline:
                answered = sum(c.answered_by.get(pid, 0) for c in clients)
                self.fail(f"pid {pid} answered {answered} of {count} messages; "
                          f"failures: {failures}")
            time.sleep(0.02)  # counting what the client threads did

    def _stop(self, clients):
        for client in clients:
            client.stop.set()
        for client in clients:
            client.join(LOOP_SECONDS)
