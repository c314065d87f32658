"""
Random schedules of upgrades and faults against real twistd processes, with
the invariants of docs/design.md checked after every step:

  1. fresh connections are answered by one process only, the pidfile's;
  2. every other live process of the server is draining;
  3. (through 1 and 2) a generation took the listeners back only when its
     successor died while current;
  4. SIGTERM to the pidfile's pid ends every process of the server within
     --drain-timeout + --abort-grace;

and no request or transaction is lost unless the process serving it was
killed with SIGKILL while it ran.

The steps: SIGHUP with a good deploy, a broken one, one that never gets
ready, one that dies right after taking over; SIGHUP storms; slow requests;
transactions held open; SIGKILL of the newest or an older generation;
SIGTERM. Hypothesis draws the schedules (stateful testing); a failing run
prints its steps and its seed, and replays with

    GRACEFUL_SCHEDULE_SEED=<seed> python -m twisted.trial tests.test_schedules_e2e

GRACEFUL_SCHEDULE_EXAMPLES (default 8) and GRACEFUL_SCHEDULE_STEPS (default
10) make a longer run.
"""

import functools
import os
import random
import signal
import socket
import threading
import time

from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as with_seed
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    rule,
    run_state_machine_as_test,
)
from twisted.trial import unittest

from tests.e2e import ServerProcess, http_get, pid_in

SEED_ENV = "GRACEFUL_SCHEDULE_SEED"
READY_TIMEOUT = 3.0
DRAIN_TIMEOUT = 4.0
ABORT_GRACE = 1.0
SLACK = 15.0  # python start-up and reaping on a loaded 2-core machine

TAC = """
import os
from twisted.application import service
from twisted.internet import defer, reactor
from twisted_graceful import GracefulService, GracefulSite, metrics, self_test_request
from twisted_graceful.hello import HelloResource, ServerIdentity
from twisted_graceful.store import Store
from twisted_graceful.txn import TxnFactory

{fault}

application = service.Application("graceful-schedules")
graceful = GracefulService(reactor, pidfile={pidfile!r}, ready_timeout={ready_timeout},
                           drain_timeout={drain_timeout}, abort_grace={abort_grace},
                           idle_grace=0.2, backoff_base=0.05, backoff_max=0.2)
identity = ServerIdentity(graceful)
store = Store({db!r}, reactor, generation=lambda: graceful.generation)
store.setServiceParent(graceful)
site = GracefulSite(HelloResource(reactor, identity, 0, 1, store=store),
                    drain_tracker=graceful.tracker)
graceful.add_listener("http", "tcp:0:interface=127.0.0.1", site)
txn = TxnFactory(store, identity, reactor, drain_tracker=graceful.tracker)
graceful.add_listener("txn", "tcp:0:interface=127.0.0.1", txn)
metrics.install(graceful, "tcp:0:interface=127.0.0.1", http_site=site, txn_factory=txn)
graceful.add_readiness_check(lambda: self_test_request(reactor, site))
graceful.add_readiness_check(store.check)
{readiness}
graceful.setServiceParent(application)
"""

DEPLOYS = {
    "good": ("", ""),
    "broken": ("raise RuntimeError('a broken deploy')", ""),
    "never-ready": ("", "graceful.add_readiness_check(lambda: defer.Deferred())"),
    "dies-after-takeover": ("", "graceful.when_ready().addCallback("
                                "lambda _: reactor.callLater(0.3, os._exit, 7))"),
}


class Client:
    """
    One slow request or one held transaction, in a thread: when it ran and
    how it ended.
    """

    def __init__(self, kind, work):
        self.kind = kind
        self.started = time.monotonic()
        self.ended = None
        self.result = None
        self.error = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _run(self, work):
        try:
            self.result = work()
        except Exception as e:
            self.error = e
        finally:
            self.ended = time.monotonic()

    def join(self, timeout):
        self._thread.join(timeout)

    def during(self, moments):
        end = self.ended if self.ended is not None else time.monotonic()
        return any(self.started <= t <= end for t in moments)


def recorded(step):
    """
    Keep the first failure of any schedule with the steps that led to it:
    Hypothesis replays a failing schedule to confirm it, and with real
    processes the replay may fail elsewhere or not at all.
    """

    @functools.wraps(step)
    def run(self, *args, **kwargs):
        try:
            return step(self, *args, **kwargs)
        except BaseException as e:
            self.failures.append((list(self.steps), e))
            raise

    return run


class ScheduleSteps(RuleBasedStateMachine):
    """
    The steps every schedule has, whatever serves: slow requests and
    transactions held open, each a L{Client}, checked at the end by
    L{check_clients}. A subclass starts its server in C{start_server} and
    sets C{ports}; L{run_schedules} sets C{testcase}, C{log} and
    C{failures}.
    """

    testcase = None  # set by the test
    log = None  # every schedule's steps, for the failure report
    failures = None  # (steps, exception) of every failed step

    def __init__(self):
        super().__init__()
        self.steps = []
        self.log.append(self.steps)
        self.kills = []  # when we sent SIGKILL
        self.stops = []  # when we sent SIGTERM
        self.clients = []
        self.server = None
        self.start_server()  # the subclass's

    @rule(seconds=st.integers(1, 3))
    @recorded
    def slow_request(self, seconds):
        self.steps.append(f"slow_request({seconds})")
        port = self.ports["http"]
        self.clients.append(Client(
            "slow request",
            lambda: http_get(port, f"/slow?seconds={seconds}", timeout=DRAIN_TIMEOUT + SLACK)))

    @rule(seconds=st.floats(0.5, 3.0))
    @recorded
    def open_transaction(self, seconds):
        self.steps.append(f"open_transaction({seconds:.2f})")
        port = self.ports["txn"]
        key = f"k{len(self.clients)}"

        def work():
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                lines = sock.makefile("rb")
                if not lines.readline():  # the greeting
                    return None  # queued when the server stopped: never served
                sock.sendall(f"BEGIN\r\nSET {key} 1\r\n".encode())
                begin = lines.readline()
                if not begin.startswith(b"250"):
                    return ("begin", begin)  # told to go away before its transaction began
                lines.readline()
                time.sleep(seconds)  # the client thinks: the transaction stays open
                sock.sendall(b"COMMIT\r\n")
                return ("commit", lines.readline())

        self.clients.append(Client("transaction", work))

    def kill_one(self, pids, which):
        """
        SIGKILL the C{which}-th of C{pids}, if any, and settle. (Draws do not
        depend on the processes alive: Hypothesis replays a schedule by its
        draws.)
        """
        if not pids:
            return
        victim = pids[which % len(pids)]
        self.kills.append(time.monotonic())
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass  # its drain ended meanwhile
        self.server.wait_gone(victim)
        self.settle_and_check()

    def check_clients(self):
        """
        No slow request or transaction was lost unless the process serving
        it was killed while it ran, or it connected as the server stopped.
        """
        for client in self.clients:
            client.join(DRAIN_TIMEOUT + SLACK)
            if client.during(self.kills):
                continue  # the process serving it may have been the one killed
            if client.during(self.stops) and (client.error is not None or client.result is None):
                # Connected in the instant the server stopped: the connection
                # was queued on a listener the last process closed.
                continue
            self.testcase.assertIsNone(client.error, f"{client.kind} failed")
            if client.kind == "slow request":
                self.testcase.assertEqual(client.result[0], 200)
                self.testcase.assertIsNotNone(pid_in(client.result[1]))
            else:
                stage, reply = client.result
                if stage == "begin":  # never begun, and told so at a boundary
                    self.testcase.assertRegex(reply, rb"^421 ")
                else:
                    self.testcase.assertRegex(reply, rb"^250 committed txid=\d+")


def run_schedules(testcase, machine, examples=8, steps=10):
    """
    Run the state machine C{machine} (a L{ScheduleSteps}) on random schedules
    drawn from C{GRACEFUL_SCHEDULE_SEED} (or a new seed);
    C{GRACEFUL_SCHEDULE_EXAMPLES} and C{GRACEFUL_SCHEDULE_STEPS} override the
    defaults. A failure is the first failed step's, with its steps and the
    seed to replay them with.
    """
    seed = int(os.environ.get(SEED_ENV) or random.randrange(2 ** 32))
    schedules, failures = [], []
    machine = type("Machine", (machine,),
                   {"testcase": testcase, "log": schedules, "failures": failures})
    config = settings(
        max_examples=int(os.environ.get("GRACEFUL_SCHEDULE_EXAMPLES", str(examples))),
        stateful_step_count=int(os.environ.get("GRACEFUL_SCHEDULE_STEPS", str(steps))),
        deadline=None, database=None, derandomize=False,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each run is real time
        suppress_health_check=list(HealthCheck), print_blob=False,
    )
    try:
        run_state_machine_as_test(with_seed(seed)(machine), settings=config)
    except BaseException as e:
        # Report the first failure itself, with its steps.
        if failures:
            steps, first = failures[0]
        else:
            steps, first = (schedules[-1] if schedules else []), e
        steps = "\n    ".join(steps) or "(none)"
        note = (f"steps of the last schedule:\n    {steps}\n"
                f"replay the schedules with {SEED_ENV}={seed}")
        print(note)
        if hasattr(first, "add_note"):
            first.add_note(note)
        raise first


class Schedules(ScheduleSteps):
    """
    One server at a time; restarted when a step leaves nothing serving.
    """

    # --- the server -----------------------------------------------------------
    def start_server(self):
        cwd = os.path.abspath(self.testcase.mktemp())
        os.makedirs(cwd)
        self.tac = os.path.join(cwd, "app.tac")
        self.pidfile = os.path.join(cwd, "twistd.pid")
        self.db = os.path.join(cwd, "store.sqlite3")
        self.deploy("good")
        self.server = ServerProcess(self.testcase, ["--python", self.tac], cwd=cwd).start()
        current, _, entries = self.server.wait_settled(serving=True)
        self.current = current
        self.ports = {name: int(where.rsplit(":", 1)[1])
                      for name, where in entries[current]["listeners"].items()}

    def deploy(self, name):
        fault, readiness = DEPLOYS[name]
        with open(self.tac, "w") as f:
            f.write(TAC.format(fault=fault, readiness=readiness, pidfile=self.pidfile,
                               db=self.db, ready_timeout=READY_TIMEOUT,
                               drain_timeout=DRAIN_TIMEOUT, abort_grace=ABORT_GRACE))

    def settle_and_check(self):
        """
        Wait until no upgrade runs or is scheduled, then check invariants 1
        and 2; start a new server if nothing is left.
        """
        current, live, _ = self.server.wait_settled(timeout=READY_TIMEOUT + DRAIN_TIMEOUT
                                                    + ABORT_GRACE + SLACK)
        if not live:
            self.start_server()
            return
        self.current = current
        self.server.assert_only_current_accepts(self.ports["http"], current, requests=8)

    def older(self):
        return sorted(self.server.live_processes() - {self.current})

    # --- steps ------------------------------------------------------------
    @rule(deploy=st.sampled_from(["good", "good", "broken", "never-ready",
                                  "dies-after-takeover"]))
    @recorded
    def hup(self, deploy):
        self.steps.append(f"hup({deploy!r})")
        self.deploy(deploy)
        answer = self.server.request_upgrade(self.current)
        if deploy == "dies-after-takeover" and answer in ("started", "scheduled"):
            # It takes over, then dies 0.3 s later: wait for both.
            new, _, _ = self.server.wait_settled(changed_from=self.current)
            self.server.wait_gone(new)
        self.settle_and_check()

    @rule(count=st.integers(2, 4), deploy=st.sampled_from(["good", "broken"]))
    @recorded
    def hup_storm(self, count, deploy):
        self.steps.append(f"hup_storm({count}, {deploy!r})")
        self.deploy(deploy)
        for _ in range(count):
            # One after the other as fast as each is answered (signals sent
            # at once would merge into one in the kernel).
            if self.server.request_upgrade(self.current) is None:
                break  # it handed over and exited between two of our signals
        self.settle_and_check()

    @rule()
    @recorded
    def kill_current(self):
        self.steps.append("kill_current()")
        self.kills.append(time.monotonic())
        os.kill(self.current, signal.SIGKILL)
        self.server.wait_gone(self.current)
        self.settle_and_check()

    @rule(which=st.integers(0, 7))
    @recorded
    def kill_older(self, which):
        self.steps.append(f"kill_older({which})")
        self.kill_one(self.older(), which)

    @rule()
    @recorded
    def terminate(self):
        self.steps.append("terminate()")
        self.stop_server()
        self.start_server()

    def stop_server(self):
        """
        Invariant 4: SIGTERM to the pidfile's pid ends every process.
        """
        current, live, _ = self.server.wait_settled(timeout=READY_TIMEOUT + DRAIN_TIMEOUT
                                                    + ABORT_GRACE + SLACK)
        if live:
            self.stops.append(time.monotonic())
            os.kill(current, signal.SIGTERM)
            self.server.assert_all_gone_within(DRAIN_TIMEOUT + ABORT_GRACE + SLACK)

    @recorded
    def teardown(self):
        if self.server is not None:
            self.stop_server()
        self.check_clients()


class ScheduleTests(unittest.SynchronousTestCase):
    def test_random_schedules_keep_the_invariants(self):
        run_schedules(self, Schedules)
