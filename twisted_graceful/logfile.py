"""
Two generations write one log file while they overlap.

twistd's L{LogFile} opens an existing file C{rb+} and seeks to its end, not
with C{O_APPEND}: each process writes at its own offset, so the old and the
new generation overwrite each other's lines. With C{O_APPEND} every write
lands at the current end of the file, whoever makes it.
"""

import fcntl
import os
import weakref

_patched = False


def set_append(fd):
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_APPEND:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_APPEND)


def append_to_logfiles():
    """
    Make every L{twisted.python.logfile.BaseLogFile} this process opens (or
    reopens on rotation) append-only. Idempotent.
    """
    global _patched
    if _patched:
        return
    from twisted.python import logfile

    original = logfile.BaseLogFile._openFile

    def _openFile(self):
        original(self)
        set_append(self._file.fileno())
        _open_logfiles.add(self)

    logfile.BaseLogFile._openFile = _openFile
    _patched = True


_open_logfiles = weakref.WeakSet()


def stop_rotating():
    """
    Once the next generation writes to the same file, only it may rotate it:
    two processes renaming one log would overwrite each other's files.
    """
    for logfile in list(_open_logfiles):
        logfile.rotateLength = None
