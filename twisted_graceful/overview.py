"""
The operator's view of a whole server, read from its status file: every
process alive (the master and its workers, or the generations of a
self-replacing server) and the last upgrades as a timeline. The status page
(L{twisted_graceful.statuspage}) shows it in a browser, C{python -m
twisted_graceful top} in a terminal; both read this one view.

Nothing here imports prometheus_client or the reactor.
"""

import datetime
import textwrap
import time

from twisted_graceful.pidfile import pid_alive
from twisted_graceful.timeline import STAGES

# What a person watching an upgrade reads for each recorded state.
SHOWN_STATES = {
    "starting": "starting",
    "serving": "serving",
    "upgrading": "upgrading",
    "draining": "draining",
    "shutting-down": "draining",  # stopping: it drains with no successor
    "exited": "exiting",
}
STAGE_NAMES = {
    "signal_at": "signal", "spawned_at": "spawned", "ready_at": "ready",
    "handed_over_at": "handed over", "drained_at": "drained", "exited_at": "exited",
}
SHOW_UPGRADES = 5


def server_overview(doc, now=None, alive=pid_alive):
    """
    C{{"processes": [row, ...], "upgrades": [record, ...], "at": now}} from
    a status file's content (L{twisted_graceful.statusfile.read_status}).

    A row: C{pid}, C{role} (C{master}, C{worker}, or C{generation} without a
    master), C{generation}, C{state} (one of L{SHOWN_STATES}' values),
    C{connections}, C{transactions}, C{requests} (L{None} for a master,
    which serves nothing), C{uptime_seconds}, C{updated_at}. The master
    first, then the newest generation first.

    An upgrade: the L{twisted_graceful.timeline} record, with C{pid} (who ran
    it); the newest first.
    """
    now = time.time() if now is None else now
    processes = (doc or {}).get("processes") or {}
    entries = {int(pid): entry for pid, entry in processes.items()
               if pid.isdigit() and isinstance(entry, dict)}
    # A master knows which of its workers it retired: they drain.
    told = {}
    for pid, entry in entries.items():
        if entry.get("role") == "master" and alive(pid):
            for worker in entry.get("workers") or []:
                told[worker.get("pid")] = worker.get("state")
    rows = []
    for pid, entry in entries.items():
        if entry.get("state") in ("gone",) or not alive(pid):
            continue
        role = entry.get("role") or "generation"
        state = SHOWN_STATES.get(entry.get("state"), entry.get("state") or "?")
        if told.get(pid) == "draining" and state in ("serving", "draining"):
            state = "draining"
        live = entry.get("live") or {}
        serves = role != "master"
        rows.append({
            "pid": pid, "role": role, "generation": entry.get("generation"), "state": state,
            "connections": live.get("connections") if serves else None,
            "transactions": live.get("transactions") if serves else None,
            "requests": live.get("requests") if serves else None,
            "uptime_seconds": max(0.0, now - entry["started_at"])
            if entry.get("started_at") else None,
            "updated_at": entry.get("updated_at"),
        })
    rows.sort(key=lambda r: (r["role"] != "master", -(r["generation"] or 0), r["pid"]))
    upgrades = []
    for pid, entry in entries.items():
        for record in entry.get("upgrades") or []:
            if not isinstance(record, dict):
                continue
            record = dict(record, pid=pid)
            if record.get("result") is None and not alive(pid):
                record["result"] = "unknown"
                record["error"] = f"pid {pid} is gone without saying how the upgrade ended"
            upgrades.append(record)
    upgrades.sort(key=lambda r: r.get("spawned_at") or 0, reverse=True)
    return {"at": now, "processes": rows, "upgrades": upgrades[:SHOW_UPGRADES]}


def stage_list(record):
    """
    (stage name, timestamp) for each stage the upgrade reached, in order; a
    failed upgrade says C{failed} (or C{timed out}) instead of C{ready}, and
    one whose new generation died after the handover ends C{taken back}.
    """
    result = record.get("result")
    stages = []
    for key in STAGES:
        at = record.get(key)
        if key == "ready_at" and result not in (None, "ok", "taken back"):
            stages.append(("timed out" if result == "timeout" else result,
                           at or record.get("exited_at")))
        elif key == "exited_at" and result == "taken back":
            stages.append(("taken back", at))
        elif at is not None:
            stages.append((STAGE_NAMES[key], at))
    return stages


def _clock(timestamp):
    return datetime.datetime.fromtimestamp(timestamp).strftime("%H:%M:%S")


def _duration(seconds):
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _count(value):
    return "-" if value is None else str(value)


def describe_upgrade_record(record):
    """
    One line: who upgraded to what, each stage with its time (seconds after
    the signal), and how it ended.
    """
    signal = record.get("signal_at")
    parts = []
    for name, at in stage_list(record):
        offset = f" +{at - signal:.1f}s" if signal and at and name != "signal" else ""
        parts.append(f"{name} {_clock(at)}{offset}" if at else name)
    result = record.get("result") or "in progress"
    children = ", ".join(str(p) for p in record.get("child_pids") or []) or "?"
    line = (f"{_clock(record['spawned_at']) if record.get('spawned_at') else '?'} "
            f"{record.get('reason') or 'upgrade'}: generation {record.get('from_generation')} "
            f"(pid {record.get('pid')}) -> pid {children}: "
            f"{result}")
    if record.get("duration_seconds") is not None and result == "ok":
        line += f" in {record['duration_seconds']:.2f} s"
    return line, " > ".join(parts), record.get("error"), record.get("output_tail") or []


def render_text(view, width=100, pidfile=None):
    """
    The overview as lines of text, for C{top}.
    """
    rows = view["processes"]
    head = " ".join(part for part in ("twisted-graceful", pidfile, _clock(view["at"]),
                                      f"{len(rows)} process(es)") if part)
    lines = [head, ""]
    header = (f"{'PID':>7}  {'ROLE':<10} {'GEN':>4}  {'STATE':<10} {'CONNS':>6} "
              f"{'IN TXN':>6} {'REQUESTS':>9}  {'UPTIME':>8}")
    lines.append(header)
    for row in rows:
        lines.append(
            f"{row['pid']:>7}  {row['role']:<10} {_count(row['generation']):>4}  "
            f"{row['state']:<10} {_count(row['connections']):>6} "
            f"{_count(row['transactions']):>6} {_count(row['requests']):>9}  "
            f"{_duration(row['uptime_seconds']):>8}")
    if not rows:
        lines.append("  (no process of this server is alive)")
    lines += ["", "Last upgrades (newest first):"]
    if not view["upgrades"]:
        lines.append("  none yet (kill -HUP the pid in the pidfile to upgrade)")
    for record in view["upgrades"]:
        summary, stages, error, tail = describe_upgrade_record(record)
        lines.append("  " + summary)
        lines += textwrap.wrap(stages, width, initial_indent="    ", subsequent_indent="      ",
                               break_on_hyphens=False)
        if error and record.get("result") != "ok":
            lines.append("    why: " + error)
            for out in tail[-3:]:
                lines.append("    | " + out)
    return [line[:width] for line in lines]
