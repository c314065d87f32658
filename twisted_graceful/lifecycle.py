"""
The lifecycle of one generation: every state, every transition, every
refusal, in one place (docs/design.md, "Lifecycle").

    starting --ready--> serving --upgrade--> upgrading --child-ready--> draining
                          ^  ^                   |                        |  |
                          |  +---child-failed----+                        |  |
                          +--------------------take-back------------------+  |
                                                                             |
    starting/serving/upgrading/draining --stop--> shutting-down              |
    draining/shutting-down --drained--> exited <-----------------------------+

C{take-back}: the generation we handed over to died while it was current
(the lineage record says so) and we still hold our sockets; we serve again.
A successor that exits after handing over to its own successor, or because
the server shuts down, ended normally: nothing is taken back.

Observers hear one vocabulary of events, each with C{pid}, C{generation}
and C{state} (the state after the event) besides its own details:

  - C{serving}: C{source} (C{bound}, C{systemd}, C{inherited}: announced by
    the parent; C{orphaned}: the parent died before it heard we were ready;
    C{took-back}), C{parent_pid}, C{listeners} (name -> address);
  - C{upgrade-requested}: C{reason} (C{SIGHUP}), C{answer} (C{started},
    C{scheduled}, C{refused}), C{why}: every request, once it is answered;
  - C{upgrade-scheduled}: C{delay} (seconds), C{reason}: a signal during the
    backoff after a failed upgrade, run once the backoff is over;
  - C{upgrade-unscheduled}: C{why}: that attempt will not run;
  - C{upgrade-started}: C{child_pid}, C{reason};
  - C{upgrade-failed}, C{upgrade-ok}: C{outcome} (an L{UpgradeOutcome});
  - C{handed-over}: C{child_pid}, C{pidfile_error} (a sentence or None);
  - C{successor-exited}: C{successor_pid}, C{how}, C{result} (one of the
    L{twisted_graceful.lineage} answers);
  - C{shutting-down}: C{was_current} (False for an old generation that was
    draining already);
  - C{drained}: C{report} (a L{DrainReport}).
"""

import os
import time
from typing import Optional

from twisted.application.internet import backoffPolicy
from twisted.internet import defer, error
from twisted.logger import Logger

from twisted_graceful import lineage as L
from twisted_graceful._twisted import stop_rotating
from twisted_graceful.drain import TRANSACTION

STARTING = "starting"
SERVING = "serving"
UPGRADING = "upgrading"
DRAINING = "draining"
SHUTTING_DOWN = "shutting-down"
EXITED = "exited"
STATES = (STARTING, SERVING, UPGRADING, DRAINING, SHUTTING_DOWN, EXITED)

# (state, event) -> the next state.
TRANSITIONS = {
    (STARTING, "ready"): SERVING,
    (STARTING, "stop"): SHUTTING_DOWN,
    (SERVING, "upgrade"): UPGRADING,
    (SERVING, "stop"): SHUTTING_DOWN,
    (UPGRADING, "child-ready"): DRAINING,
    (UPGRADING, "child-failed"): SERVING,
    (UPGRADING, "stop"): SHUTTING_DOWN,
    (DRAINING, "take-back"): SERVING,
    (DRAINING, "stop"): SHUTTING_DOWN,
    (DRAINING, "drained"): EXITED,
    (SHUTTING_DOWN, "drained"): EXITED,
}

# (state, event) -> why it is refused, for a log line an operator reads.
REFUSALS = {
    (STARTING, "upgrade"): "this generation is not serving yet",
    (UPGRADING, "upgrade"): (
        "an upgrade to pid {child} is already in progress (this generation keeps serving "
        "until it is ready)"),
    (DRAINING, "upgrade"): (
        "this generation handed over to pid {successor} and is draining; signal the process "
        "named in the pidfile instead"),
    (SHUTTING_DOWN, "upgrade"): "this generation is shutting down",
    (EXITED, "upgrade"): "this generation has exited",
    (SHUTTING_DOWN, "stop"): "already shutting down",
    (EXITED, "stop"): "this generation has exited already",
}


class IllegalTransition(Exception):
    """
    An event that cannot happen in this state: a bug, not an operator's
    mistake.
    """


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


def upgrade_backoff(base, maximum):
    """
    Seconds to wait after the Nth failed upgrade in a row (N from 1):
    C{base}, doubling up to C{maximum}.
    """
    policy = backoffPolicy(initialDelay=base, maxDelay=maximum, factor=2.0, jitter=lambda: 0.0)
    return lambda failures: policy(failures - 1)


class StateMachine:
    """
    What every state machine of this package shares: a transition table and
    its refusals, observers told of every event (with C{pid}, C{generation},
    C{role} and C{state}), and upgrades requested by a signal: one at a
    time, refused with a reason, or scheduled after the backoff that
    follows failed ones. Subclasses say what starting an upgrade means
    (L{_start}).
    """

    log = Logger()
    role: Optional[str] = None
    transitions: dict[tuple[str, str], str] = {}
    refusals: dict[tuple[str, str], str] = {}
    initial_state: Optional[str] = None

    def __init__(self, reactor, *, generation=1, pid=None, ready_timeout=30.0, backoff_base=1.0,
                 backoff_max=60.0):
        self.reactor = reactor
        self.generation = generation
        self._pid = pid
        self.ready_timeout = ready_timeout
        self.backoff = upgrade_backoff(backoff_base, backoff_max)
        self.state = self.initial_state
        self.failures = 0
        self.next_attempt_at = None
        self.last_outcome = None
        self.upgrade_started = None
        self._timeout_call = None
        self._scheduled = None
        self.observers = []

    @property
    def pid(self):
        return os.getpid() if self._pid is None else self._pid

    # --- the table ----------------------------------------------------------
    def refusal(self, event):
        """
        Why C{event} cannot happen now, or L{None} if it can.
        """
        if (self.state, event) in self.transitions:
            return None
        reason = self.refusals.get((self.state, event))
        if reason is None:
            return f"{event!r} cannot happen while {self.state}"
        return reason.format(**self._refusal_details())

    def _refusal_details(self):
        return {}

    def _move(self, event):
        key = (self.state, event)
        if key not in self.transitions:
            raise IllegalTransition(f"{self._who()}: {self.refusal(event)}")
        self.state = self.transitions[key]

    def _tell(self, event, **details):
        details.update(pid=self.pid, generation=self.generation, state=self.state)
        if self.role is not None:
            details["role"] = self.role
        for observer in list(self.observers):
            try:
                observer(event, **details)
            except Exception:
                self.log.failure("observer of {event!r} failed", event=event)

    def _who(self):
        return f"pid {self.pid} generation {self.generation}"

    # --- upgrade requests ---------------------------------------------------
    def request_upgrade(self, reason="SIGHUP"):
        """
        Start an upgrade if none is running; say why not otherwise.

        @return: C{"started"}, C{"scheduled"} or C{"refused"}.
        """
        answer, why = self._request_upgrade(reason)
        self._tell("upgrade-requested", reason=reason, answer=answer, why=why)
        return answer

    def refuse_upgrade(self, reason, why):
        """
        Refuse a request for a reason of the caller's (a worker: only its
        master upgrades it).
        """
        self.log.warn("{who}: {reason} ignored: {why}", who=self._who(), reason=reason, why=why)
        self._tell("upgrade-requested", reason=reason, answer="refused", why=why)
        return "refused"

    def _request_upgrade(self, reason):
        refusal = self.refusal("upgrade")
        if refusal is not None:
            self.log.warn("{who}: {reason} ignored: {why}", who=self._who(), reason=reason,
                          why=refusal)
            return "refused", refusal
        now = self.reactor.seconds()
        if self.next_attempt_at is not None and now < self.next_attempt_at:
            wait = self.next_attempt_at - now
            if self._scheduled is None or not self._scheduled.active():
                self._scheduled = self.reactor.callLater(wait, self._run_scheduled, reason)
                self.log.warn(
                    "{who}: {reason}: backing off after {n} failed upgrade(s); the next attempt "
                    "will run in {wait:.1f} s", who=self._who(), reason=reason, n=self.failures,
                    wait=wait)
                self._tell("upgrade-scheduled", delay=wait, reason=reason)
                return "scheduled", f"backing off after {self.failures} failed upgrade(s)"
            self.log.warn(
                "{who}: {reason} ignored: an attempt is already scheduled in {wait:.1f} s "
                "(backing off after {n} failed upgrade(s))", who=self._who(), reason=reason,
                wait=wait, n=self.failures)
            return "scheduled", "an attempt is already scheduled"
        self._start(reason)
        return "started", None

    def _run_scheduled(self, reason):
        self._scheduled = None
        if self.refusal("upgrade") is None:
            self._start(reason + " (after backoff)")
        else:
            self._tell("upgrade-unscheduled", why=self.refusal("upgrade"))

    def _cancel_scheduled(self, why):
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
            self._tell("upgrade-unscheduled", why=why)
        self._scheduled = None

    def _start(self, reason):
        raise NotImplementedError()

    def _elapsed(self):
        return self.reactor.seconds() - self.upgrade_started

    def _cancel_timeout(self):
        if self._timeout_call is not None and self._timeout_call.active():
            self._timeout_call.cancel()
        self._timeout_call = None

    def _record_failure(self, result, child_pid, error, output, what="the child"):
        """
        A failed upgrade: count it for the backoff, keep its outcome, say so.
        """
        self._cancel_timeout()
        self.failures += 1
        delay = self.backoff(self.failures)
        self.next_attempt_at = self.reactor.seconds() + delay
        self.last_outcome = UpgradeOutcome(
            result, child_pid, error, self._elapsed() if self.upgrade_started else None, output)
        tail = "\n    ".join(output[-10:]) if output else "(no output)"
        self.log.warn(
            "{who}: Upgrade failed: {error}. {keeps}; next upgrade allowed in {delay:.1f} s. "
            "Last output of {what}:\n    {tail}",
            who=self._who(), error=error, delay=delay, tail=tail, what=what,
            keeps=self._who_keeps_serving())
        self._tell("upgrade-failed", outcome=self.last_outcome)

    def _who_keeps_serving(self):
        return "This generation keeps serving"

    def _record_success(self, child_pid, output):
        self._cancel_timeout()
        self.failures = 0
        self.next_attempt_at = None
        self.last_outcome = UpgradeOutcome("ok", child_pid, None, self._elapsed(), output)
        self._tell("upgrade-ok", outcome=self.last_outcome)


class Lifecycle(StateMachine):
    """
    The state machine of one generation, and the upgrade it runs: one at a
    time, a ready timeout, backoff after failures, the handover, the drain,
    and the take-back.

    @param lineage: the L{L.Lineage} record shared with every generation.
    @param ports: the listening ports: C{pause()}, C{resume()}, C{close()}.
    @param tracker: the L{DrainTracker} of this generation's connections.
    @param spawn: C{spawn(lifecycle)} starts the next generation and returns
        its process (C{pid}, C{kill()}, C{output_tail()}, C{finished},
        C{ended}); the process reports back through L{child_ready},
        L{child_failed} and L{child_ended}.
    @param exit: called once a handover drain is over (stops the reactor).
    """

    transitions = TRANSITIONS
    refusals = REFUSALS
    initial_state = STARTING

    def __init__(self, reactor, *, lineage, ports, tracker, spawn, generation=1, pid=None,
                 ready_timeout=30.0, drain_timeout=60.0, abort_grace=5.0,
                 drain_mode=TRANSACTION, backoff_base=1.0, backoff_max=60.0, exit=None):
        StateMachine.__init__(self, reactor, generation=generation, pid=pid,
                              ready_timeout=ready_timeout, backoff_base=backoff_base,
                              backoff_max=backoff_max)
        self.lineage = lineage
        self.ports = ports
        self.tracker = tracker
        self._spawn = spawn
        self.drain_timeout = drain_timeout
        self.abort_grace = abort_grace
        self.drain_mode = drain_mode
        self._exit = exit
        self.child = None  # the next generation while it starts
        self.successor = None  # the process we handed over to
        self._handover_drain = None

    def _refusal_details(self):
        return {"child": getattr(self.child, "pid", "?"),
                "successor": getattr(self.successor, "pid", "?")}

    # --- starting ---------------------------------------------------------
    def ready(self, source, parent_pid=None, listeners=None):
        """
        This generation accepts now (its ports are reading).
        """
        self._move("ready")
        self._tell("serving", source=source, parent_pid=parent_pid, listeners=listeners or {})

    # --- upgrading --------------------------------------------------------
    def _start(self, reason):
        self._move("upgrade")
        self.upgrade_started = self.reactor.seconds()
        self.log.info("{who}: {reason}: starting generation {next}", who=self._who(),
                      reason=reason, next=self.generation + 1)
        try:
            child = self._spawn(self)
        except Exception as e:
            self._failed("failed", None, f"could not be spawned: {e}", [])
            return
        self.child = child
        self.lineage.expect(self.pid, child.pid)
        self.log.info(
            "{who}: spawned generation {next} as pid {child}; waiting up to {t} s for it to be "
            "ready", who=self._who(), next=self.generation + 1, child=child.pid,
            t=self.ready_timeout)
        self._timeout_call = self.reactor.callLater(self.ready_timeout, self._child_timed_out)
        self._tell("upgrade-started", child_pid=child.pid, reason=reason)

    def child_ready(self, child):
        """
        C{child} wrote C{READY <its pid>}: it has taken over (the lineage
        record names it) and accepts. We stop accepting and drain.
        """
        if child is not self.child or self.state != UPGRADING:
            return
        current = self.lineage.read()["current"]
        if current != child.pid:
            child.kill()
            self._child_gone(child, f"said it was ready but did not take over (the lineage "
                                    f"record names pid {current})")
            return
        self._hand_over(child)

    def _hand_over(self, child):
        self._cancel_timeout()
        elapsed = self._elapsed()
        self.log.info("{who}: generation {next} (pid {child}) is ready after {ms:.0f} ms; "
                      "handing over", who=self._who(), next=self.generation + 1, child=child.pid,
                      ms=elapsed * 1000)
        self._move("child-ready")
        self.child = None
        self.successor = child
        # Stop accepting, but keep our copies of the sockets until the drain
        # ends: if the new generation dies meanwhile, we take them back.
        self.ports.pause()
        # The next generation writes to the same log file from now on; only
        # one process may rotate it.
        stop_rotating()
        self._record_success(child.pid, child.output_tail())
        pidfile_error = self.lineage.pidfile_error
        self.log.info(
            "{who}: stopped accepting; pid {child} (generation {next}) serves now{pidfile}; "
            "draining", who=self._who(), child=child.pid, next=self.generation + 1,
            pidfile=f" and {self.lineage.pidfile} names it" if self.lineage.pidfile else "")
        self._tell("handed-over", child_pid=child.pid,
                   pidfile_error=None if pidfile_error is None else str(pidfile_error))
        self._handover_drain = self.tracker.drain(self.drain_mode, self.drain_timeout,
                                                  self.abort_grace)
        self._handover_drain.addCallback(self._handover_drained)

    def child_failed(self, child, how):
        """
        C{child} is alive but failed the handshake (garbage on the ready
        pipe, someone else's PID): give up on it.
        """
        if child is not self.child or self.state != UPGRADING:
            return
        if self.lineage.give_up(child.pid):
            self.log.warn("{who}: pid {child} {how}, but it has taken over already",
                          who=self._who(), child=child.pid, how=how)
            self._hand_over(child)
            return
        child.kill()
        self._failed("failed", child.pid, f"pid {child.pid} {how}", child.output_tail())

    def _child_timed_out(self):
        self._timeout_call = None
        child = self.child
        if child is None or self.state != UPGRADING:
            return
        if self.lineage.give_up(child.pid):
            # It took over in the instant before the timeout; its READY is
            # on the way.
            self._hand_over(child)
            return
        child.kill()
        self._failed(
            "timeout", child.pid,
            f"pid {child.pid} was not ready within {self.ready_timeout} s; stopped it "
            f"(SIGTERM, then SIGKILL if it lingers)", child.output_tail())

    def child_ended(self, child, how):
        """
        A process we spawned exited (C{how}: "exited with status 1", "was
        killed by SIGKILL").
        """
        if child is self.child and self.state == UPGRADING:
            self._child_gone(child, f"{how} before it was ready")
        elif child is self.successor:
            self._successor_ended(child, how)

    def _child_gone(self, child, why):
        result = self.lineage.successor_ended(self.pid, self.generation, child.pid,
                                              can_take_back=True)
        if result == L.TOOK_BACK:
            why += " (it had taken over: the pidfile names this generation again)"
        self._failed("failed", child.pid, f"pid {child.pid} {why}", child.output_tail())

    def _successor_ended(self, successor, how):
        can_take_back = (self.state == DRAINING and self._handover_drain is not None
                         and not self._handover_drain.called)
        result = self.lineage.successor_ended(self.pid, self.generation, successor.pid,
                                              can_take_back)
        self._tell("successor-exited", successor_pid=successor.pid, how=how, result=result)
        if result == L.TOOK_BACK:
            self._take_back(successor, how)
        elif result == L.HANDED_ON:
            self.log.info("{who}: pid {child} (generation {next}) {how} after handing over to "
                          "a newer generation", who=self._who(), child=successor.pid,
                          next=self.generation + 1, how=how)
        elif result == L.STOPPING:
            self.log.info("{who}: pid {child} (generation {next}) {how}: the server is "
                          "shutting down", who=self._who(), child=successor.pid,
                          next=self.generation + 1, how=how)
        else:
            self.log.critical(
                "{who}: pid {child} (generation {next}), which took over from us, {how}; "
                "nothing accepts on the listeners until a new server starts",
                who=self._who(), child=successor.pid, next=self.generation + 1, how=how)

    def _take_back(self, successor, how):
        self._move("take-back")
        self.tracker.resume()
        self._handover_drain = None
        self.successor = None
        self.ports.resume()
        self.log.critical(
            "{who}: pid {child} (generation {next}), which took over from us, {how}; took the "
            "listeners back and serving again", who=self._who(), child=successor.pid,
            next=self.generation + 1, how=how)
        # Counts for the backoff like a failed upgrade.
        self._failed("failed", successor.pid, f"pid {successor.pid} {how} after it took over; "
                     f"pid {self.pid} took the listeners back", successor.output_tail(),
                     moved=True)
        self._tell("serving", source="took-back", parent_pid=None, listeners={})

    def _failed(self, result, child_pid, error, output, moved=False):
        self._cancel_timeout()
        if not moved:
            self._move("child-failed")
        self.child = None
        self._record_failure(result, child_pid, error, output)

    # --- draining and stopping --------------------------------------------
    def _handover_drained(self, report):
        self._drained(report)
        if self._exit is not None:
            self._exit()

    def stop(self):
        """
        A real shutdown (SIGTERM, SIGINT, or the reactor stopping after the
        handover drain). Abandons an upgrade in progress.

        @return: a Deferred firing with the drain's L{DrainReport} once no
            connection (and no abandoned child) is left.
        """
        refusal = self.refusal("stop")
        if refusal is not None:
            if self.state == EXITED:
                return defer.succeed(self.tracker.report)
            self.log.warn("{who}: stop ignored: {why}", who=self._who(), why=refusal)
            return self.tracker.drain(self.drain_mode, self.drain_timeout, self.abort_grace)
        self._cancel_scheduled("shutting down")
        abandoned = None
        was_current = self.state != DRAINING
        if self.state == UPGRADING and self.child is not None:
            abandoned = self.child
            self._cancel_timeout()
            self.lineage.give_up(abandoned.pid)
            self.log.warn("{who}: shutting down during an upgrade: stopping unready pid {child}",
                          who=self._who(), child=abandoned.pid)
            abandoned.kill()
        if was_current:
            if self.lineage is not None:
                self.lineage.stop(self.pid)
            self.log.info("{who}: shutting down; no longer accepting", who=self._who())
            self.ports.close()
        self._move("stop")
        self._tell("shutting-down", was_current=was_current)
        d = self.tracker.drain(self.drain_mode, self.drain_timeout, self.abort_grace)
        if abandoned is not None and not abandoned.finished:
            # Wait for it too: it gets SIGTERM, then SIGKILL after --abort-grace.
            d = defer.gatherResults([d, abandoned.ended]).addCallback(lambda r: r[0])

        def drained(report):
            self._drained(report)
            return report

        return d.addCallback(drained)

    def _drained(self, report):
        if self.state == EXITED:
            return
        self._move("drained")
        self.ports.close()
        self.log.info("{who}: {summary}; exiting", who=self._who(), summary=report.summary())
        self._tell("drained", report=report)


    def exit_now(self):
        """
        Stop this process as SIGTERM would (the reactor stops, C{stop()}
        drains).
        """
        if self._exit is not None:
            self._exit()


def stop_reactor(reactor):
    """
    The C{exit} of a generation under twistd: stop the reactor (then
    C{stopService} finds the drain done and the process exits).
    """

    def stop():
        try:
            reactor.stop()
        except error.ReactorNotRunning:
            pass  # a SIGTERM during the drain got there first

    return stop
