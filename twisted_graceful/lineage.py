"""
The lineage record: which generation of this server is the current one.

Every generation of one server shares one small record (an anonymous file,
C{memfd}, created by the first generation and handed down like a listener).
It names the I{current} generation: the one that accepts connections and
that the pidfile names. It changes only under a lock, and only by
compare-and-swap, so two generations racing for the listeners cannot both
win (docs/design.md, "Invariants"):

  - a new generation takes over only from the parent that spawned it, only
    while that parent still expects it (L{Lineage.take_over});
  - an old generation takes the listeners back only from a successor that
    died while it was current (L{Lineage.successor_ended});
  - a real shutdown marks the record stopping: from then on nobody takes
    over or back (L{Lineage.stop}).

The pidfile is written inside the same lock, so its writes happen in the
order of the record's changes and it never names an older generation than
the record does.
"""

import fcntl
import json
import os
import stat
import tempfile

from twisted_graceful.handoff import close_quietly
from twisted_graceful.pidfile import remove_pidfile_if_own, write_pidfile

# What a generation learns when a successor of it ends (successor_ended):
STILL_CURRENT = "still-current"  # it never took over: we were current all along
TOOK_BACK = "took-back"  # it was current when it died: we are current again
HANDED_ON = "handed-on"  # a newer generation is current: it ended normally
STOPPING = "stopping"  # the server is shutting down: nobody takes anything back
CANNOT_TAKE_BACK = "cannot-take-back"  # it died current, but we closed our sockets

_MAX_RECORD = 4096


class Lineage:
    """
    One server's lineage record, through a file descriptor every generation
    holds. POSIX record locks (C{lockf}) are held per process, so they
    exclude the other generations even though all of them share one open
    file description.

    @ivar pidfile: written whenever the current generation changes, or
        L{None}.
    @ivar pidfile_error: the C{OSError} of the last pidfile write, if it
        failed (the record changed anyway: a handover must not stop half-way
        because of the pidfile).
    """

    def __init__(self, fd, pidfile=None):
        self.fd = fd
        self.pidfile = pidfile
        self.pidfile_error = None

    @classmethod
    def create(cls, pidfile=None):
        """
        A new, empty record, for the first generation of a server.
        """
        try:
            fd = os.memfd_create("twisted-graceful-lineage", 0)
        except (AttributeError, OSError):
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        os.set_inheritable(fd, False)
        return cls(fd, pidfile)

    @staticmethod
    def check(fd):
        """
        @raise ValueError: C{fd} cannot be a lineage record (a sentence).
        """
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise ValueError(f"fd {fd} is not open ({e.strerror})")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"fd {fd} is not a lineage record (not a regular file)")
        if st.st_size > _MAX_RECORD:
            raise ValueError(f"fd {fd} is not a lineage record ({st.st_size} bytes)")

    def fileno(self):
        return self.fd

    def close(self):
        if self.fd is not None:
            close_quietly(self.fd)
            self.fd = None

    # --- the record -------------------------------------------------------
    def read(self):
        """
        The record: C{current} (pid), C{generation}, C{pending} (the pid the
        current generation expects to take over from it), C{stopping}.
        """
        data = os.pread(self.fd, _MAX_RECORD, 0)
        try:
            doc = json.loads(data.decode("utf-8")) if data.strip() else {}
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        return {
            "current": doc.get("current"),
            "generation": doc.get("generation"),
            "pending": doc.get("pending"),
            "stopping": bool(doc.get("stopping")),
        }

    def _change(self, decide):
        """
        Run C{decide(record)} under the lock; it changes the record in place
        and returns the answer; the record is written back if it changed, the
        pidfile if C{current} changed.
        """
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            before = self.read()
            record = dict(before)
            answer = decide(record)
            if record != before:
                data = json.dumps(record, sort_keys=True).encode("utf-8")
                os.pwrite(self.fd, data, 0)
                os.ftruncate(self.fd, len(data))
                if record["current"] != before["current"] and record["current"]:
                    self._write_pidfile(record["current"])
            return answer
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _write_pidfile(self, pid):
        self.pidfile_error = None
        if not self.pidfile:
            return
        try:
            write_pidfile(self.pidfile, pid)
        except OSError as e:
            self.pidfile_error = e

    # --- transitions ------------------------------------------------------
    def begin(self, pid, generation):
        """
        The first generation of a server (bound its sockets or got them from
        systemd): it is current. twistd wrote the pidfile already.
        """

        def decide(record):
            if record["current"] is None:
                record.update(current=pid, generation=generation, pending=None, stopping=False)

        self._change(decide)

    def expect(self, parent_pid, child_pid):
        """
        The current generation spawned C{child_pid}: only that child may take
        over from it.
        """

        def decide(record):
            if record["current"] == parent_pid and not record["stopping"]:
                record["pending"] = child_pid

        self._change(decide)

    def take_over(self, parent_pid, pid, generation):
        """
        A new generation, ready, takes over from the parent that spawned it.

        @return: L{None} if it is now current, else a sentence saying why not.
        """

        def decide(record):
            if record["stopping"]:
                return "the server is shutting down"
            if record["current"] != parent_pid:
                return (f"pid {record['current']} (generation {record['generation']}) serves now, "
                        f"not pid {parent_pid}, which started this one")
            if record["pending"] != pid:
                return f"pid {parent_pid} gave up waiting for this generation"
            record.update(current=pid, generation=generation, pending=None)
            return None

        return self._change(decide)

    def give_up(self, child_pid):
        """
        The parent stops waiting for an unready child (timeout, garbage on
        the ready pipe, shutdown).

        @return: True if the child took over in the meantime (then it is
            ready, whatever made the parent give up).
        """

        def decide(record):
            if record["current"] == child_pid:
                return True
            if record["pending"] == child_pid:
                record["pending"] = None
            return False

        return self._change(decide)

    def successor_ended(self, pid, generation, successor_pid, can_take_back):
        """
        A successor of this generation (C{pid}) exited. Take the listeners
        back if it was current when it died and C{can_take_back} (this
        generation still holds its sockets).

        @return: L{STILL_CURRENT}, L{TOOK_BACK}, L{HANDED_ON}, L{STOPPING} or
            L{CANNOT_TAKE_BACK}.
        """

        def decide(record):
            if record["pending"] == successor_pid:
                record["pending"] = None
            if record["current"] == pid:
                return STILL_CURRENT
            if record["stopping"]:
                return STOPPING
            if record["current"] != successor_pid:
                return HANDED_ON
            if not can_take_back:
                return CANNOT_TAKE_BACK
            record.update(current=pid, generation=generation, pending=None)
            return TOOK_BACK

        return self._change(decide)

    def stop(self, pid):
        """
        A real shutdown of the current generation: nobody takes over or back
        from now on.

        @return: whether C{pid} was current (only the current generation's
            shutdown stops the server).
        """

        def decide(record):
            if record["current"] != pid:
                return False
            record.update(stopping=True, pending=None)
            return True

        return self._change(decide)

    def release_pidfile(self, pid):
        """
        At exit: remove the pidfile if it still names C{pid} (under the lock,
        so that a generation taking over meanwhile keeps its pidfile).
        """
        if not self.pidfile:
            return False
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            return remove_pidfile_if_own(self.pidfile, pid)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def is_current(self, pid):
        return self.read()["current"] == pid
