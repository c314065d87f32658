"""
End to end: what an operator watches while a real server upgrades. The
status page in a real headless Chromium (Selenium with Debian's
C{chromium-driver}, nothing downloaded), and C{python -m twisted_graceful
top} in a real pseudo-terminal. An open transaction holds the old
generation in its drain, so that both views must show it draining beside
the new one; its COMMIT lets it go, and both views must show it gone.
"""

import fcntl
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time

from twisted.trial import unittest

from twisted_graceful.top import CLEAR

from tests.e2e import REPO, ServerProcess, unless_required, with_default_signals
from tests.test_txn_e2e import COMMITTED, DRAINING, TxnClient

LOOPBACK = "tcp:0:interface=127.0.0.1"
TIMEOUT = 60.0
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Set to a path to keep a screenshot of the page during the upgrade
# (docs/status-page.png in the README was taken so).
SCREENSHOT_ENV = "GRACEFUL_STATUS_SCREENSHOT"
# The rows' text as rendered, read at once (the page redraws the table every
# second: elements found one by one may be replaced in between).
READ_ROWS = """return Array.from(document.querySelectorAll("#processes tbody tr"),
    tr => Array.from(tr.cells, td => td.innerText.trim()));"""
READ_TEXT = "return document.getElementById(arguments[0]).innerText;"
READ_STATE_CLASS = """const e = document.querySelector('tr[data-pid="' + arguments[0] + '"] .state');
    return e ? e.className : null;"""


def browser_missing():
    try:
        import selenium  # noqa: F401 (is it there?)
    except ImportError:
        return "selenium is not installed (pip install '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


def start_server(testcase, *extra):
    return ServerProcess(testcase, ["graceful", "--port", LOOPBACK, "--txn-port", LOOPBACK,
                                    "--drain-timeout", "60", *extra]).start()


def serving_worker(server, generation):
    """
    The pid and ports of the process of C{generation} that serves (a worker,
    or a generation without a master).
    """
    return server.wait_listening(generation, timeout=TIMEOUT)


def open_transaction(port, pid):
    """
    A transaction left open on C{pid} (BEGIN and one write, no COMMIT).
    """
    client = TxnClient(port)
    if client.pid != pid:
        raise AssertionError(f"the transaction went to pid {client.pid}, not {pid}")
    assert client.ask("BEGIN") == "250 begin"
    assert client.ask("SET watched 1") == "250 queued"
    return client


def commit_and_leave(client, pid):
    reply = client.ask("COMMIT")
    assert COMMITTED.match(reply), reply
    closing = client.read()
    assert DRAINING.match(closing) and int(DRAINING.match(closing).group(1)) == pid, closing


class Terminal:
    """
    A command in a pseudo-terminal of C{columns} x C{rows}; what it drew is
    read in a thread, the last full screen kept.
    """

    def __init__(self, testcase, argv, columns=120, rows=40):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = dict(os.environ, PYTHONPATH=REPO, COLUMNS=str(columns), LINES=str(rows))
        # As a shell starts a foreground job: SIGINT (our Ctrl-C) at its
        # default, even if this suite runs in the background.
        self.proc = subprocess.Popen(with_default_signals(argv), stdin=slave, stdout=slave,
                                     stderr=slave, env=env, close_fds=True,
                                     start_new_session=True)
        os.close(slave)
        self.text = ""
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        testcase.addCleanup(self.close)

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.text = (self.text + data.decode("utf-8", "replace"))[-200000:]

    def screen(self):
        """
        The last screen drawn completely (the one before the redraw in
        progress, if any).
        """
        with self.lock:
            frames = self.text.split(CLEAR)
        complete = frames[1:-1] + ([frames[-1]] if frames[-1].endswith("\n") else [])
        return complete[-1].replace("\r\n", "\n") if complete else ""

    def wait_screen(self, predicate, what, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"top never showed {what}; last screen:\n{screen}")
            time.sleep(0.1)  # top redraws every second: nothing finer to wait on

    def interrupt(self):
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(10)

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        os.close(self.master)


def row(screen, pid):
    """
    The columns of C{pid}'s row in top's table, or None.
    """
    for line in screen.splitlines():
        fields = line.split()
        if fields and fields[0] == str(pid):
            return fields
    return None


class TopInATerminalTests(unittest.TestCase):
    def test_top_shows_an_upgrade_as_it_happens(self):
        # Without a master: the generations replace each other.
        server = start_server(self, "--workers", "0")
        old, ports = serving_worker(server, 1)
        term = Terminal(self, [sys.executable, "-m", "twisted_graceful", "top",
                               "--pidfile", server.pidfile])
        screen = term.wait_screen(lambda s: (row(s, old) or [None])[3:4] == ["serving"],
                                  f"pid {old} serving")
        self.assertIn("none yet (kill -HUP the pid in the pidfile to upgrade)", screen)
        client = open_transaction(ports["txn"], old)
        server.signal(old, signal.SIGHUP)
        new = server.wait_handover(1, timeout=TIMEOUT)

        def both(s):
            mine, theirs = row(s, old), row(s, new)
            return (mine and theirs and mine[3] == "draining" and theirs[3] == "serving"
                    and mine[4:6] == ["1", "1"])
        screen = term.wait_screen(both, f"pid {new} serving and pid {old} draining one "
                                        f"transaction")
        self.assertEqual(row(screen, new)[:4], [str(new), "generation", "2", "serving"])
        self.assertRegex(screen, rf"SIGHUP: generation 1 \(pid {old}\) -> pid {new}: ok in ")
        self.assertRegex(screen, r"signal \S+ > spawned \S+ \+\d+\.\ds > ready \S+ \+\d+\.\ds")
        commit_and_leave(client, old)
        screen = term.wait_screen(lambda s: row(s, old) is None and row(s, new) is not None,
                                  f"pid {old} gone")
        self.assertRegex(screen, r"drained \S+\s+\+\d+\.\ds\s+>\s+exited \S+\s+\+\d+\.\ds")
        self.assertEqual(term.interrupt(), 0)
        server.signal(new, signal.SIGTERM)
        server.wait_all_exited()

    def test_top_once_without_a_server(self):
        pidfile = os.path.join(os.path.abspath(self.mktemp()), "twistd.pid")
        result = subprocess.run(
            [sys.executable, "-m", "twisted_graceful", "top", "--pidfile", pidfile, "--once"],
            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO,
                                                     COLUMNS="300"), timeout=60)
        self.assertEqual(result.returncode, 3)
        self.assertEqual(result.stdout, f"twisted-graceful {pidfile}: no status file "
                                        f"{pidfile}.status.json (is the server running, with "
                                        f"this --pidfile?); retrying every second\n")


class StatusPageInABrowserTests(unittest.TestCase):
    skip = unless_required(browser_missing())

    def browser(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        profile = tempfile.mkdtemp(prefix="tg-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                     "--window-size=1100,760"):
            options.add_argument(flag)
        # The driver named explicitly: Selenium Manager downloads nothing.
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.addCleanup(driver.quit)
        return driver

    def wait_page(self, driver, predicate, what, timeout=TIMEOUT):
        """
        Wait until C{predicate(rows)} (pid -> the cells' text as a person
        reads them) is true; return the rows.
        """
        deadline = time.monotonic() + timeout
        while True:
            rows = {int(cells[0]): cells for cells in driver.execute_script(READ_ROWS)
                    if cells and cells[0].isdigit()}
            if predicate(rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never showed {what}; it shows {rows}")
            time.sleep(0.1)  # the page redraws every second

    def test_the_page_shows_the_new_workers_take_over_and_the_old_drain(self):
        from selenium.webdriver.common.by import By

        data = os.path.abspath(self.mktemp())
        os.makedirs(data)
        db = os.path.join(data, "kv.sqlite3")
        server = start_server(self, "--workers", "1", "--metrics-port", LOOPBACK, "--db", db)
        master = server.wait_status(
            lambda entries: next((p for p, e in entries.items() if e.get("role") == "master"
                                  and e.get("state") == "serving"), None),
            "the master serving", TIMEOUT)
        old, ports = serving_worker(server, 1)
        driver = self.browser()
        driver.get(f"http://127.0.0.1:{ports['metrics']}/")
        self.assertEqual(driver.title, "twisted-graceful status")
        headers = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "#processes th")]
        self.assertEqual(headers, ["PID", "Role", "Generation", "State", "Open connections",
                                   "In a transaction", "Requests served", "Uptime"])
        rows = self.wait_page(driver, lambda r: old in r and master in r,
                              "the master and its worker")
        self.assertEqual(rows[master][:4], [str(master), "master", "1", "serving"])
        self.assertEqual(rows[old][:4], [str(old), "worker", "1", "serving"])
        self.assertIn("None yet", driver.execute_script(READ_TEXT, "upgrades"))

        # A broken deploy first: the new worker cannot start (its --db is gone).
        os.rename(data, data + ".away")
        server.signal(master, signal.SIGHUP)
        timeline = self.wait_for_text(driver, "upgrades", "Why:")
        os.rename(data + ".away", data)
        self.assertRegex(timeline, rf"SIGHUP: generation 1 \(pid {master}\) \u2192 pid \d+: "
                                   rf"failed\n")
        self.assertRegex(timeline, r"signal [\d:]+ \u2192 spawned [\d:]+ \(\+\d+\.\d s\) \u2192 "
                                   r"failed [\d:]+ \(\+\d+\.\d s\) \u2192 exited")
        self.assertRegex(timeline, r"Why: worker pid \d+ exited with status 1 before the set "
                                   r"was ready\n")
        # Its last output line is the one-line start-up error.
        self.assertIn(f"twistd graceful: --db {db}: the directory does not exist; create it "
                      f"or choose another --db", timeline)
        rows = self.wait_page(driver, lambda r: sorted(r) == sorted([master, old]),
                              "the failed worker gone")
        self.assertEqual(rows[old][1:4], ["worker", "1", "serving"])

        client = open_transaction(ports["txn"], old)
        # (During the backoff after the failure, the signal is run once it is over.)
        server.signal(master, signal.SIGHUP)
        # The master is upgrading until the old worker stopped accepting.
        rows = self.wait_page(
            driver, lambda r: len(r) == 3 and old in r and r[old][3] == "draining"
            and r[old][5] == "1" and r[master][2:4] == ["2", "serving"],
            "a new worker serving and the old one draining")
        [new] = set(rows) - {old, master}
        self.assertEqual(rows[new][1:4], ["worker", "2", "serving"])
        timeline = driver.execute_script(READ_TEXT, "upgrades")
        self.assertRegex(timeline, rf"SIGHUP( \(after backoff\))?: generation 1 \(pid {master}\) "
                                   rf"\u2192 pid {new}: ok in \d+\.\d\d s")
        self.assertRegex(timeline, r"signal [\d:]+ \u2192 spawned [\d:]+ \(\+\d+\.\d s\) \u2192 "
                                   r"ready [\d:]+ \(\+\d+\.\d s\) \u2192 handed over")
        newest = timeline.split(f"pid {new}: ok")[1].split("\n")[1]
        self.assertNotIn("exited", newest)  # the old worker still drains
        self.assertEqual(driver.execute_script(READ_STATE_CLASS, old), "state state-draining")
        if os.environ.get(SCREENSHOT_ENV):
            driver.save_screenshot(os.environ[SCREENSHOT_ENV])

        commit_and_leave(client, old)
        rows = self.wait_page(driver, lambda r: old not in r and new in r,
                              f"the old worker pid {old} gone")
        self.assertEqual(sorted(rows), sorted([master, new]))
        timeline = self.wait_for_text(driver, "upgrades", "exited")
        self.assertRegex(timeline, r"drained [\d:]+ \(\+\d+\.\d s\) \u2192 exited")
        server.signal(master, signal.SIGTERM)
        server.wait_all_exited()
        # The server is gone: the page says so, in words.
        self.wait_for_text(driver, "updated", "Cannot reach the server")

    def wait_for_text(self, driver, element_id, text, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            shown = driver.execute_script(READ_TEXT, element_id)
            if text in shown:
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"#{element_id} never said {text!r}: {shown!r}")
            time.sleep(0.1)  # the page redraws every second

