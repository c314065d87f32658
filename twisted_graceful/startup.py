"""
Start-up errors that are not usage mistakes: a port in use, a database
directory that does not exist, an inherited socket that is wrong. twistd
prints its whole usage text before any L{usage.UsageError} (its
C{app.run}), which buries the one line that matters; these are said in that
one line instead, on stderr, and the process exits 1 (as twistd does for a
usage error), so that an operator sees what failed, which option or
variable, and what to do.

A L{StartupError} is still a L{usage.UsageError}: callers that parse the
options themselves (C{preflight}, tests, a master checking new code) get
it as before.
"""

import sys

from twisted.python import usage

EXIT_STARTUP = 1


class StartupError(usage.UsageError):
    """
    The options are right, but the server cannot start with them here and
    now.
    """


def one_line(error, program="twistd graceful"):
    """
    The line an operator reads for C{error}.
    """
    return f"{program}: {error}"


def exit_with(error, err=None):
    """
    Say C{error} in one line on C{err} (stderr) and exit 1.
    """
    err = err or sys.stderr
    err.write(one_line(error) + "\n")
    err.flush()
    raise SystemExit(EXIT_STARTUP)
