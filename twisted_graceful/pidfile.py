"""
The pidfile follows the live generation (docs/design.md, fact 5).

It is written atomically (C{os.replace}) by the old generation once the new
one is ready, before the old one exits; a generation removes it at exit only
if it still names that generation's own PID.
"""

import os


def pid_alive(pid):
    """
    Is C{pid} a running process? A zombie (exited, not yet reaped) is not.
    """
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        pass
    return True


def read_pid(path):
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def write_pidfile(path, pid):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_pidfile_if_own(path, pid=None):
    """
    Remove C{path} if it names C{pid} (this process by default).
    @return: whether it was removed.
    """
    pid = os.getpid() if pid is None else pid
    if not path or read_pid(path) != pid:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
