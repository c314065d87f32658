"""
The upgrade state machine: one upgrade at a time, refused with a reason
otherwise; a failed upgrade changes nothing but the backoff.

    serving --SIGHUP--> upgrading --child ready--> handed-over (draining)
       ^                    |
       +----child failed----+   (backoff doubles, the old process keeps serving)

    serving/upgrading --SIGTERM--> shutting-down (draining)
"""

import os
import time

from twisted.logger import Logger

SERVING = "serving"
UPGRADING = "upgrading"
HANDED_OVER = "handed-over"
SHUTTING_DOWN = "shutting-down"


class UpgradeOutcome:
    def __init__(self, result, child_pid=None, error=None, duration=None, output=()):
        self.result = result  # "ok", "failed", "timeout"
        self.child_pid = child_pid
        self.error = error
        self.duration = duration
        self.output = list(output)
        self.finished_at = time.time()

    def as_dict(self):
        return {
            "result": self.result,
            "child_pid": self.child_pid,
            "error": self.error,
            "duration_seconds": self.duration,
            "output_tail": self.output,
            "finished_at": self.finished_at,
        }


class Upgrader:
    """
    Decides whether an upgrade may start, watches the child, applies the
    ready timeout and the backoff between failed attempts.

    @param start_child: C{start_child(on_ready, on_failed)} spawns the next
        generation and returns its L{NextGenerationProcess}.
    @param hand_over: called with the child's PID once it is ready.
    """

    log = Logger()

    def __init__(self, reactor, start_child, hand_over, generation=1, ready_timeout=30.0,
                 backoff_base=1.0, backoff_max=60.0, observers=()):
        self._reactor = reactor
        self._start_child = start_child
        self._hand_over = hand_over
        self.generation = generation
        self.ready_timeout = ready_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.state = SERVING
        self.child = None
        self.failures = 0
        self.next_attempt_at = None  # reactor time before which no attempt starts
        self.last_outcome = None
        self.upgrade_started = None
        self._timeout_call = None
        self._scheduled = None
        self.observers = list(observers)

    def _tell(self, event, **kw):
        for observer in self.observers:
            observer(event, **kw)

    def request_upgrade(self, reason="SIGHUP"):
        """
        Start an upgrade if none is running; say why not otherwise.

        @return: C{"started"}, C{"scheduled"} or C{"refused"}.
        """
        if self.state == UPGRADING:
            self.log.warn(
                "pid {pid} generation {gen}: {reason} ignored: an upgrade to pid {child} is already "
                "in progress (this generation keeps serving until it is ready)",
                pid=os.getpid(), reason=reason, child=self.child.pid if self.child else "?",
                gen=self.generation,
            )
            return "refused"
        if self.state in (HANDED_OVER, SHUTTING_DOWN):
            self.log.warn(
                "pid {pid} generation {gen}: {reason} ignored: this generation is {state} and "
                "draining; signal the process named in the pidfile instead",
                pid=os.getpid(), reason=reason, gen=self.generation, state=self.state,
            )
            return "refused"
        now = self._reactor.seconds()
        if self.next_attempt_at is not None and now < self.next_attempt_at:
            wait = self.next_attempt_at - now
            if self._scheduled is None or not self._scheduled.active():
                self._scheduled = self._reactor.callLater(wait, self._run_scheduled, reason)
                self.log.warn(
                    "pid {pid} generation {gen}: {reason}: backing off after {n} failed "
                    "upgrade(s); the next attempt will run in {wait:.1f} s",
                    pid=os.getpid(), gen=self.generation, reason=reason, n=self.failures, wait=wait,
                )
            else:
                self.log.warn(
                    "pid {pid} generation {gen}: {reason} ignored: an attempt is already "
                    "scheduled in {wait:.1f} s (backing off after {n} failed upgrade(s))",
                    pid=os.getpid(), gen=self.generation, reason=reason, wait=wait, n=self.failures,
                )
            return "scheduled"
        self._start(reason)
        return "started"

    def _run_scheduled(self, reason):
        self._scheduled = None
        if self.state == SERVING:
            self._start(reason + " (after backoff)")

    def _start(self, reason):
        self.state = UPGRADING
        self.upgrade_started = self._reactor.seconds()
        self.log.info(
            "pid {pid} generation {gen}: {reason}: starting generation {next}",
            pid=os.getpid(), reason=reason, gen=self.generation, next=self.generation + 1,
        )
        try:
            self.child = self._start_child(self._child_ready, self._child_failed)
        except Exception as e:
            self.child = None
            self._failed("failed", None, f"could not be spawned: {e}", [])
            return
        self.log.info(
            "pid {me} generation {gen}: spawned generation {next} as pid {pid}; waiting up to "
            "{t} s for it to be ready",
            me=os.getpid(), gen=self.generation, next=self.generation + 1, pid=self.child.pid,
            t=self.ready_timeout,
        )
        self._timeout_call = self._reactor.callLater(self.ready_timeout, self._child_timed_out)
        self._tell("started", pid=self.child.pid)

    def _elapsed(self):
        return self._reactor.seconds() - self.upgrade_started

    def _child_ready(self, pid):
        if self.state != UPGRADING:
            return
        self._cancel_timeout()
        elapsed = self._elapsed()
        self.log.info(
            "pid {me} generation {gen}: generation {next} (pid {pid}) is ready after {ms:.0f} ms; "
            "handing over",
            me=os.getpid(), gen=self.generation, next=self.generation + 1, pid=pid, ms=elapsed * 1000,
        )
        self.state = HANDED_OVER
        self.failures = 0
        self.next_attempt_at = None
        self.last_outcome = UpgradeOutcome("ok", pid, None, elapsed, self.child.output_tail())
        self._tell("ready", outcome=self.last_outcome)
        self._hand_over(pid)

    def _child_failed(self, how):
        if self.state != UPGRADING:
            return
        child = self.child
        self._failed("failed", child.pid, f"pid {child.pid} {how} before it was ready",
                     child.output_tail())

    def _child_timed_out(self):
        self._timeout_call = None
        if self.state != UPGRADING:
            return
        child = self.child
        child.kill()
        self._failed(
            "timeout", child.pid,
            f"pid {child.pid} was not ready within {self.ready_timeout} s; stopped it "
            f"(SIGTERM, then SIGKILL if it lingers)",
            child.output_tail(),
        )

    def _failed(self, result, pid, error, output):
        self._cancel_timeout()
        self.state = SERVING
        self.failures += 1
        delay = min(self.backoff_base * (2 ** (self.failures - 1)), self.backoff_max)
        self.next_attempt_at = self._reactor.seconds() + delay
        self.last_outcome = UpgradeOutcome(
            result, pid, error, self._elapsed() if self.upgrade_started else None, output
        )
        tail = "\n    ".join(output[-10:]) if output else "(no output)"
        self.log.warn(
            "pid {pid} generation {gen}: Upgrade failed: {error}. This generation keeps serving; "
            "next upgrade allowed in {delay:.1f} s. Last output of the child:\n    {tail}",
            pid=os.getpid(), error=error, gen=self.generation, delay=delay, tail=tail,
        )
        self.child = None
        self._tell("failed", outcome=self.last_outcome)

    def _cancel_timeout(self):
        if self._timeout_call is not None and self._timeout_call.active():
            self._timeout_call.cancel()
        self._timeout_call = None

    def successor_died(self, pid, how):
        """
        The generation we handed over to died while we still drain: we serve
        again. The failure counts for the backoff like a failed upgrade.
        """
        if self.state != HANDED_OVER:
            return False
        output = self.child.output_tail() if self.child else []
        self._failed("failed", pid, f"pid {pid} {how} after it took over", output)
        return True

    def shutting_down(self):
        """
        A real shutdown: abandon an upgrade in progress (kill the unready child).
        """
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        if self.state == UPGRADING and self.child is not None:
            self.log.warn(
                "pid {me} generation {gen}: shutting down during an upgrade: killing unready "
                "pid {pid}", me=os.getpid(), gen=self.generation, pid=self.child.pid)
            self._cancel_timeout()
            self.child.kill()
        if self.state != HANDED_OVER:
            self.state = SHUTTING_DOWN
