"""
A UDP PING load for the tests: PINGs sent at a fixed rate from one socket,
every PONG collected, so that a test can say which were answered, by whom,
and how many times. Bounded in time and count; loopback only.
"""

import re
import socket
import threading
import time

PONG = re.compile(rb"^PONG (\S+) pid (\d+) generation (\d+)\n?$")


class PingLoad:
    """
    Send C{PING <n>} to C{port} at C{rate} per second (in a thread) until
    L{stop}, at most C{limit} of them, and collect the answers:
    C{answers[token]} is the list of (pid, generation) that answered it.
    """

    def __init__(self, port, rate=1000, limit=200000, host="127.0.0.1"):
        self.address = (host, port)
        self.rate = rate
        self.limit = limit
        self.sent = []
        self.answers = {}
        self.garbage = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        # Our own receive buffer must not be what loses PONGs.
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        except OSError:
            pass
        self.sock.settimeout(0.2)
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._sender = threading.Thread(target=self._send, daemon=True)

    def start(self):
        self._receiver.start()
        self._sender.start()
        return self

    def _send(self):
        started = time.monotonic()
        n = 0
        while not self._stop.is_set() and n < self.limit:
            due = started + n / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(min(delay, 0.01))  # pacing the sender, not waiting for the server
                continue
            token = b"t%d" % n
            try:
                self.sock.sendto(b"PING " + token, self.address)
            except OSError:
                continue  # a full send buffer: try the same token again
            with self._lock:
                self.sent.append(token)
            n += 1

    def _receive(self):
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            try:
                data, _ = self.sock.recvfrom(2048)
            except socket.timeout:
                if self._stop.is_set() and self._done_receiving:
                    return
                continue
            except OSError:
                return
            m = PONG.match(data)
            with self._lock:
                if m is None:
                    self.garbage.append(data)
                else:
                    self.answers.setdefault(m.group(1), []).append(
                        (int(m.group(2)), int(m.group(3))))

    _done_receiving = False

    def stop(self, wait=10.0):
        """
        Stop sending; wait until every PING is answered (or C{wait} seconds);
        return the tokens never answered.
        """
        self._stop.set()
        self._sender.join(30)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not self.unanswered():
                break
            time.sleep(0.05)  # answers in flight: nothing to wait on but their arrival
        self._done_receiving = True
        self._receiver.join(5)
        self.sock.close()
        return self.unanswered()

    def unanswered(self):
        with self._lock:
            return [t for t in self.sent if t not in self.answers]

    def answered_twice(self):
        with self._lock:
            return {t: a for t, a in self.answers.items() if len(a) > 1}

    def pids_by_generation(self):
        """
        generation -> the pids that answered for it.
        """
        pids = {}
        with self._lock:
            for answers in self.answers.values():
                for pid, generation in answers:
                    pids.setdefault(generation, set()).add(pid)
        return pids

    def generations(self):
        with self._lock:
            return sorted({g for answers in self.answers.values() for _, g in answers})

    def count_sent(self):
        with self._lock:
            return len(self.sent)


def udp_drops():
    """
    The kernel's count of datagrams dropped for a full receive buffer
    (C{RcvbufErrors} in /proc/net/snmp): what explains a lost PING.
    """
    try:
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        return int(rows[1][rows[0].index("RcvbufErrors")])
    except (OSError, IndexError, ValueError):
        return None

