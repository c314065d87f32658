"""
The HTTP access log an operator chooses: C{--access-log PATH|-|none}.

Lines are twisted.web's combined log format (C{combinedLogFormatter}), the
one C{twistd web} writes, but through a buffer: a request costs a list
append, and the buffer is written at most once a second (or when it holds
L{MAX_BUFFERED} bytes, and when the site stops), one C{write} of whole lines
at a time. Twisted's own access log goes through C{twisted.logger} (an
event, its formatting and a write per request), into the same stream as the
server's own log.

A file is a L{twisted.python.logfile.LogFile}: opened in append mode
(every generation writes at the end of the same file), rotated at
L{ROTATE_LENGTH} bytes as twistd rotates C{twistd.log}, and on SIGUSR1 with
it; once a newer generation writes to it, only that one rotates it. Workers
of a master never rotate it (several write it at once; an external
C{logrotate} with C{copytruncate} can).
"""

import os
import signal
import sys

from twisted.internet import task
from twisted.python import logfile

NONE = "none"
STDOUT = "-"
FLUSH_SECONDS = 1.0
MAX_BUFFERED = 64 * 1024
ROTATE_LENGTH = 1000000  # twistd's default for twistd.log


class AccessLogError(Exception):
    """
    An C{--access-log} that cannot be written; the message says why.
    """


def check_access_log(spec):
    """
    The problem with C{spec} as an C{--access-log}, or L{None}.
    """
    if spec in (NONE, STDOUT):
        return None
    if not spec:
        return "--access-log needs a file, - (standard output) or none"
    path = os.path.abspath(spec)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return f"--access-log {path}: the directory {directory} does not exist"
    if os.path.isdir(path):
        return f"--access-log {path} is a directory; name a file"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"--access-log {path}: this user cannot write it"
    if not os.path.exists(path) and not os.access(directory, os.W_OK):
        return f"--access-log {path}: this user cannot create files in {directory}"
    return None


class BufferedAccessLog:
    """
    Lines kept in memory and written in batches to C{target} (an object with
    C{write(bytes)} and C{flush()}; a L{logfile.LogFile} rotates).
    """

    def __init__(self, target, reactor, flush_seconds=FLUSH_SECONDS, max_buffered=MAX_BUFFERED):
        self.target = target
        self._reactor = reactor
        self._lines = []
        self._size = 0
        self._max = max_buffered
        self._loop = task.LoopingCall(self.flush)
        self._loop.clock = reactor
        self._flush_seconds = flush_seconds
        self._rotating = False

    def start(self):
        """
        Once serving (twistd has set up its own log and its SIGUSR1).
        """
        if not self._loop.running:
            self._loop.start(self._flush_seconds, now=False)
        if (isinstance(self.target, logfile.LogFile) and self.target.rotateLength is not None
                and not self._rotating):
            self._rotating = True
            _rotate_on_sigusr1(self, self._reactor)

    def stop(self):
        if self._loop.running:
            self._loop.stop()
        self.flush()

    def write(self, line):
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self._max:
            self.flush()

    def flush(self):
        if not self._lines:
            return
        data = "".join(self._lines).encode("utf-8", "replace")
        self._lines = []
        self._size = 0
        try:
            self.target.write(data)
            self.target.flush()
        except OSError as e:
            sys.stderr.write(f"access log: {len(data)} bytes lost, could not write: {e}\n")

    def rotate(self):
        self.flush()
        rotate = getattr(self.target, "rotate", None)
        if rotate is not None and getattr(self.target, "rotateLength", None) is not None:
            rotate()


class _Stdout:
    def write(self, data):
        sys.stdout.flush()  # what twisted.logger wrote before, first
        os.write(sys.stdout.fileno(), data)

    def flush(self):
        pass


def open_access_log(spec, reactor, rotate=True):
    """
    The L{BufferedAccessLog} C{spec} names, or L{None} for C{none}.
    C{rotate=False} for a worker of a master: several workers write one
    file, and two that rotated it would rename each other's files.

    @raise AccessLogError: the file cannot be opened.
    """
    if spec == NONE:
        return None
    if spec == STDOUT:
        return BufferedAccessLog(_Stdout(), reactor)
    path = os.path.abspath(spec)
    try:
        target = logfile.LogFile.fromFullPath(path, rotateLength=ROTATE_LENGTH if rotate else None)
    except OSError as e:
        raise AccessLogError(f"--access-log {path}: {e.strerror or e}")
    return BufferedAccessLog(target, reactor)


def _rotate_on_sigusr1(access_log, reactor):
    """
    SIGUSR1 rotates twistd's log; make it rotate the access log too,
    keeping whatever handler is there.
    """
    previous = signal.getsignal(signal.SIGUSR1)

    def rotate(signum, frame):
        if callable(previous):
            previous(signum, frame)
        reactor.callFromThread(access_log.rotate)

    signal.signal(signal.SIGUSR1, rotate)


def log_when_serving(graceful, site, access_log):
    """
    Give C{site} C{access_log} once C{graceful} serves (what its site
    answers before that is its own readiness self-test, as the metrics do
    not count it), and write what is left when the process shuts down.
    """
    def event(name, **details):
        if name == "serving" and site.access_log is not access_log:
            site.access_log = access_log
            access_log.start()

    graceful.add_observer(event)
    graceful.reactor.addSystemEventTrigger("during", "shutdown", access_log.stop)
