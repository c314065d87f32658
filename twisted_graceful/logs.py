"""
Machine-read logs: twisted.logger's JSON, one event per line.

C{twistd graceful --log-format json} selects it; for any other twistd
application (a .tac) the equivalent is
C{twistd --logger twisted_graceful.logs.json_observer ...}. Either way the
choice is on the command line, so every later generation (which re-runs the
same command line) logs in the same format, to the same place.

Events go where twistd's text log would go: stdout in the foreground
(C{--nodaemon} without C{--logfile}, or C{--logfile -}), else the log file
(C{twistd.log} by default).
"""

import sys

from twisted.logger import jsonFileLogObserver
from twisted.python import logfile

LOG_FORMATS = ("text", "json")

_config: dict = {}


def configure(logfile=None, nodaemon=False):
    """
    Tell L{json_observer} where twistd would log (called by the plugin's
    options, which know twistd's parsed options).
    """
    _config.clear()
    _config.update(logfile=logfile, nodaemon=bool(nodaemon))


def _twistd_config():
    if _config:
        return _config
    from twisted_graceful.command import twistd_config_from_argv

    return twistd_config_from_argv(sys.argv)


def json_observer():
    """
    A twistd C{--logger} factory: JSON lines (no RFC 7464 record separator,
    which C{eventsFromJSONLogFile} reads as well) where twistd would log.
    """
    config = _twistd_config()
    name = config.get("logfile")
    if name == "-" or (config.get("nodaemon") and not name):
        out = sys.stdout
    else:
        out = logfile.LogFile.fromFullPath(name or "twistd.log")
    return jsonFileLogObserver(out, recordSeparator="")
