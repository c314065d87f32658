"""
The last upgrades of one process, stage by stage, for the operator's view
(the status page and C{top}): when the signal came, when the next
generation (or the next set of workers) was spawned, when it was ready or
why it failed (with its last output lines), when the old one handed over,
drained and exited.

It is kept in the process that runs the upgrade (a generation, or the
master) and written with its status entry, so it outlives a successor that
dies and needs nothing but the events of the lifecycle.
"""

KEEP_UPGRADES = 5
KEEP_OUTPUT_LINES = 8
STAGES = ("signal_at", "spawned_at", "ready_at", "handed_over_at", "drained_at", "exited_at")


class UpgradeTimeline:
    """
    Observer of a L{twisted_graceful.lifecycle.StateMachine}: one record per
    upgrade (the newest last), each a dict of C{STAGES} timestamps (L{None}
    until reached) and C{reason}, C{result} (L{None} while it runs, then
    C{ok}, C{failed} or C{timeout}), C{error}, C{output_tail},
    C{duration_seconds}, C{from_generation}, C{child_pids} and, under a master, C{retired_pids}
    (the old workers still draining).
    """

    def __init__(self, clock, keep=KEEP_UPGRADES):
        self.clock = clock
        self.keep = keep
        self.records = []
        self._signal_at = None  # a signal answered "scheduled": its attempt runs later

    def __call__(self, event, workers=None, generation=None, **details):
        now = self.clock()
        current = self.records[-1] if self.records else None
        if event == "upgrade-requested" and details.get("answer") == "scheduled":
            self._signal_at = self._signal_at or now
        elif event == "upgrade-started":
            signal_at, self._signal_at = self._signal_at, None
            reason = details.get("reason") or ""
            child = details.get("child_pid")
            if child is not None:
                children = [child]
            else:  # a master: the new set, one generation above the serving one
                children = [w["pid"] for w in workers or ()
                            if generation is not None and (w.get("generation") or 0) > generation]
            self.records.append({
                "reason": reason, "from_generation": generation,
                "signal_at": signal_at or now, "spawned_at": now,
                "ready_at": None, "handed_over_at": None, "drained_at": None, "exited_at": None,
                "result": None, "error": None, "output_tail": [], "duration_seconds": None,
                "child_pids": children, "retired_pids": [],
            })
            del self.records[:-self.keep]
        elif current is None or current["exited_at"] is not None:
            return
        elif event in ("upgrade-ok", "upgrade-failed"):
            outcome = details["outcome"]
            current.update(result=outcome.result, error=outcome.error,
                           duration_seconds=outcome.duration,
                           output_tail=[line for line in outcome.output if line.strip()]
                           [-KEEP_OUTPUT_LINES:])
            if outcome.result != "ok":
                current["exited_at"] = now  # the failed child was stopped
                return
            current["ready_at"] = now
            if workers is not None:
                # A master's upgrade is over once every old worker stopped
                # accepting: handed over now; drained when the last exits.
                current["handed_over_at"] = now
                current["retired_pids"] = [w["pid"] for w in workers
                                           if w.get("state") == "draining"
                                           and w.get("generation") != generation]
                self._retired_gone(current, now)
        elif event == "handed-over":
            current["handed_over_at"] = now
        elif event == "worker-exited" and details.get("expected"):
            if details.get("worker_pid") in current["retired_pids"]:
                current["retired_pids"].remove(details["worker_pid"])
                self._retired_gone(current, now)
        elif event == "drained" and current["handed_over_at"] is not None \
                and workers is None:
            # A generation that handed over: its drain is the upgrade's last
            # stage, and it exits right after.
            current["drained_at"] = current["exited_at"] = now
        elif event == "serving" and details.get("source") == "took-back":
            current["result"] = "taken back"
            current["error"] = "the new generation died; this one serves again"
            current["exited_at"] = now

    def _retired_gone(self, record, now):
        if not record["retired_pids"]:
            record["drained_at"] = record["exited_at"] = now

    def as_list(self):
        return [dict(r, child_pids=list(r["child_pids"]), retired_pids=list(r["retired_pids"]),
                     output_tail=list(r["output_tail"])) for r in self.records]
