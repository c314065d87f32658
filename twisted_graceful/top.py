"""
C{python -m twisted_graceful top --pidfile twistd.pid}: the status page in
a terminal (over SSH, no browser), redrawn every second from the status
file next to the pidfile: every process and the last upgrades
(L{twisted_graceful.overview}). Ctrl-C leaves.

A plain redraw (clear the screen, write the lines): it works in any
terminal, tmux and a serial console alike, and needs no curses.
"""

import os
import shutil
import sys
import time

from twisted_graceful.overview import render_text, server_overview
from twisted_graceful.pidfile import pid_alive
from twisted_graceful.statusfile import read_status, status_path

CLEAR = "\x1b[H\x1b[2J"


def frame(pidfile, now=None, alive=pid_alive, width=100):
    """
    The lines of one screen; the first says when nothing can be shown.
    """
    doc = read_status(status_path(pidfile))
    if doc is None:
        return [f"twisted-graceful {pidfile}: no status file {status_path(pidfile)} "
                f"(is the server running, with this --pidfile?); retrying every second"[:width]]
    return render_text(server_overview(doc, now=now, alive=alive), width=width, pidfile=pidfile)


def top(pidfile, interval=1.0, once=False, out=None, sleep=time.sleep, iterations=None):
    """
    Redraw every C{interval} seconds until interrupted (or C{iterations}
    frames); with C{once}, print one frame without clearing the screen.

    @return: the exit status: 0, or 3 with C{once} when there is no status
        file.
    """
    out = out or sys.stdout
    pidfile = os.path.abspath(pidfile)
    drawn = 0
    try:
        while True:
            # One screen for a script is not cut to a terminal's width.
            width = 10 ** 6 if once else shutil.get_terminal_size((100, 24)).columns
            lines = frame(pidfile, width=width)
            if once:
                out.write("\n".join(lines) + "\n")
                out.flush()
                return 0 if os.path.exists(status_path(pidfile)) else 3
            out.write(CLEAR + "\n".join(lines) + "\n")
            out.flush()
            drawn += 1
            if iterations is not None and drawn >= iterations:
                return 0
            sleep(interval)
    except KeyboardInterrupt:
        out.write("\n")
        return 0
