"""
systemd socket activation: adopt the listening sockets systemd passed
(C{LISTEN_PID}, C{LISTEN_FDS}, C{LISTEN_FDNAMES}, fds from 3 on) instead of
binding them.

We read the variables ourselves rather than through L{twisted.python.systemd}:
importing L{twisted.internet.endpoints} makes Twisted consume (delete)
C{LISTEN_PID}/C{LISTEN_FDS}, and it returns nothing at all when the names do
not match the count (docs/design.md, fact 7). In Twisted 26.10 C{twistd graceful} does not
import C{endpoints} before our options run, but an application (a C{.tac}, a
plugin) may. So:

  - this module keeps a copy of the variables taken when it is first imported
    (C{twisted_graceful/__init__} imports it first);
  - if they are gone from C{os.environ} and our copy is empty too, what
    Twisted's C{systemd:} endpoint parser captured is used.

After adoption the variables are removed from the environment, so nothing else
this process starts (the next generation included: it inherits the sockets
through our own handoff) sees them.
"""

import os
import sys
from collections import OrderedDict

from twisted_graceful.listeners import (
    ListenerError,
    check_listening_socket,
    fd_limit,
    set_receive_buffer,
    shorten,
)

LISTEN_PID = "LISTEN_PID"
LISTEN_FDS = "LISTEN_FDS"
LISTEN_FDNAMES = "LISTEN_FDNAMES"
LISTEN_VARIABLES = (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES)
SD_LISTEN_FDS_START = 3

PREFIX = "systemd socket activation"

# (pid, variables) as they were when this module was first imported.
_early = (os.getpid(), {k: os.environ[k] for k in LISTEN_VARIABLES if k in os.environ})
_adopted = False


class SystemdError(ListenerError):
    """
    The socket activation variables or descriptors are wrong; the message says
    which and why.
    """


class PassedSocket:
    """
    One descriptor systemd passed: its fd, position and name (C{""} when
    unnamed).
    """

    def __init__(self, fd, index, name):
        self.fd = fd
        self.index = index
        self.name = name

    def describe(self):
        return f"fd {self.fd} named {self.name!r}" if self.name else f"fd {self.fd} (index {self.index})"

    def __repr__(self):
        return f"PassedSocket({self.fd}, {self.index}, {self.name!r})"


def _from_twisted_endpoints():
    """
    What Twisted's C{systemd:} endpoint parser took from the environment when
    L{twisted.internet.endpoints} was imported (it deletes LISTEN_PID and
    LISTEN_FDS), or L{None}.
    """
    endpoints = sys.modules.get("twisted.internet.endpoints")
    parser = getattr(endpoints, "_SystemdParser", None)
    sddaemon = getattr(parser, "_sddaemon", None)
    if sddaemon is None:
        return None
    try:
        descriptors = list(sddaemon.inheritedDescriptors())
        names = list(getattr(sddaemon, "_names", ()))
    except Exception:
        return None
    if not descriptors:
        return None
    if descriptors != list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(descriptors))):
        return None
    found = {LISTEN_PID: str(os.getpid()), LISTEN_FDS: str(len(descriptors))}
    if names:
        found[LISTEN_FDNAMES] = ":".join(names)
    return found


def listen_variables(environ=None):
    """
    The socket activation variables this process was started with: from
    C{environ}; for C{os.environ}, falling back on our early copy and on what
    Twisted's endpoint parser consumed.
    """
    real = environ is None or environ is os.environ
    environ = os.environ if environ is None else environ
    found = {k: environ[k] for k in LISTEN_VARIABLES if k in environ}
    if not real or _adopted or LISTEN_FDS in found or LISTEN_PID in found:
        return found
    pid, early = _early
    if pid == os.getpid() and (LISTEN_FDS in early or LISTEN_PID in early):
        return dict(early)
    recovered = _from_twisted_endpoints()
    if recovered is not None:
        return recovered
    if LISTEN_FDNAMES in found:
        raise SystemdError(
            f"{PREFIX}: LISTEN_FDNAMES={found[LISTEN_FDNAMES]!r} is set but LISTEN_FDS and "
            f"LISTEN_PID are gone: twisted.internet.endpoints consumed them before "
            f"twisted-graceful could read them (and kept nothing: its names did not match the "
            f"count); import twisted_graceful before twisted.internet.endpoints"
        )
    return found


def is_socket_activated(environ=None):
    """
    Were we (or some process) handed sockets by systemd? True as soon as
    C{LISTEN_FDS} or C{LISTEN_PID} is present: whether they are valid is for
    L{parse_passed_sockets} to say.
    """
    found = listen_variables(environ)
    return LISTEN_FDS in found or LISTEN_PID in found


def parse_passed_sockets(environ=None, pid=None, start=SD_LISTEN_FDS_START):
    """
    Validate the variables and list the descriptors they describe.

    @param pid: the PID LISTEN_PID must name (ours by default).
    @param start: the first descriptor (3, except in tests).
    @return: a list of L{PassedSocket}.
    @raise SystemdError: for a missing or malformed variable.
    """
    found = listen_variables(environ)
    pid = os.getpid() if pid is None else pid
    pid_text = found.get(LISTEN_PID)
    fds_text = found.get(LISTEN_FDS)
    if pid_text is None:
        raise SystemdError(
            f"{PREFIX}: LISTEN_FDS={fds_text!r} is set but LISTEN_PID is not; systemd sets both"
        )
    try:
        listen_pid = int(pid_text.strip())
        if listen_pid <= 0:
            raise ValueError(listen_pid)
    except ValueError:
        raise SystemdError(f"{PREFIX}: LISTEN_PID={pid_text!r} is not a process ID")
    if listen_pid != pid:
        whose = ""
        if listen_pid == os.getppid():
            whose = (" (our parent: a wrapper that starts twistd must exec it, "
                     "e.g. 'exec twistd ...', so that it keeps the PID systemd gave the sockets to)")
        raise SystemdError(
            f"{PREFIX}: LISTEN_PID={listen_pid} names another process{whose}; this is pid {pid}, "
            f"so the sockets in LISTEN_FDS were not passed to it"
        )
    if fds_text is None:
        raise SystemdError(f"{PREFIX}: LISTEN_PID={pid_text!r} is set but LISTEN_FDS is not")
    try:
        count = int(fds_text.strip())  # ValueError past 4300 digits
    except ValueError:
        count = None
    if count is None or count <= 0:
        raise SystemdError(
            f"{PREFIX}: LISTEN_FDS={shorten(fds_text)} is not a positive number of sockets"
        )
    # Bounded before anything is built from it: fds start + count - 1 must fit
    # under the process's fd limit.
    limit = fd_limit()
    if count > limit - start:
        raise SystemdError(
            f"{PREFIX}: LISTEN_FDS={shorten(count)} passes more sockets than this process "
            f"can have (its limit is {limit} open files, RLIMIT_NOFILE)"
        )
    names_text = found.get(LISTEN_FDNAMES)
    if names_text is None:
        names = [""] * count
    else:
        names = names_text.split(":")
        if len(names) != count:
            raise SystemdError(
                f"{PREFIX}: LISTEN_FDNAMES={shorten(names_text)} names {len(names)} socket(s) but "
                f"LISTEN_FDS={fds_text!r} passes {count}; every socket needs a name "
                f"(FileDescriptorName= in its .socket unit)"
            )
    return [PassedSocket(start + i, i, name) for i, name in enumerate(names)]


def _listing(passed, most=10):
    """
    The passed sockets, as an error message lists them: the first C{most}.
    """
    text = ", ".join(p.describe() for p in passed[:most])
    if len(passed) > most:
        text += f" and {len(passed) - most} more"
    return text


def _choose(spec, option, passed, names_known):
    where = f"{option} {spec.description}"
    listing = _listing(passed)
    if spec.name and not names_known:
        raise SystemdError(
            f"{where}: no socket named {spec.name!r}: LISTEN_FDNAMES is not set, so the "
            f"{len(passed)} socket(s) passed ({listing}) have no names; name them with "
            f"FileDescriptorName= (systemd-socket-activate --fdname=) or choose one by "
            f"position with systemd:index=N"
        )
    if spec.index >= 0:
        if spec.index >= len(passed):
            raise SystemdError(
                f"{where}: index {spec.index} is out of range: LISTEN_FDS passes "
                f"{len(passed)} socket(s) ({listing})"
            )
        chosen = passed[spec.index]
        if spec.name and chosen.name != spec.name:
            raise SystemdError(
                f"{where}: the socket at index {spec.index} is named {chosen.name!r}, "
                f"not {spec.name!r} (passed: {listing})"
            )
        return chosen
    matching = [p for p in passed if p.name == spec.name]
    if not matching:
        raise SystemdError(
            f"{where}: systemd passed no socket named {spec.name!r} (passed: {listing}); "
            f"add a .socket unit with FileDescriptorName={spec.name} to the service's Sockets= "
            f"(or --fdname for systemd-socket-activate)"
        )
    if len(matching) > 1:
        raise SystemdError(
            f"{where}: {len(matching)} sockets are named {spec.name!r} "
            f"({', '.join(str(p.fd) for p in matching)}): one listener takes one socket; "
            f"put each ListenStream= in its own .socket unit with its own "
            f"FileDescriptorName=, or choose with systemd:name={spec.name}:index=N"
        )
    return matching[0]


def adopt(specs, environ=None, options=None, pid=None, start=SD_LISTEN_FDS_START):
    """
    Take the sockets systemd passed for the listeners of kind C{systemd}.

    @param specs: listener name -> L{ListenSpec}; only those of kind
        C{systemd} are looked at (the others are the caller's to bind).
    @param options: listener name -> the option that named it (for errors).
    @return: listener name -> non-blocking socket (a dup; the passed fds are
        closed and the variables removed from C{environ}).
    @raise SystemdError: naming the variable, option or socket at fault.
    """
    global _adopted, _early
    options = options or {}
    real = environ is None or environ is os.environ
    environ = os.environ if environ is None else environ
    passed = parse_passed_sockets(environ, pid, start)
    names_known = any(p.name for p in passed) or LISTEN_FDNAMES in listen_variables(environ)
    chosen = OrderedDict()
    taken = {}
    for name, spec in specs.items():
        if spec.kind != "systemd":
            continue
        option = options.get(name, "--port")
        socket_info = _choose(spec, option, passed, names_known)
        if socket_info.fd in taken:
            other = taken[socket_info.fd]
            raise SystemdError(
                f"{option} {spec.description} and {options.get(other, other)} "
                f"{specs[other].description} both ask for the same socket "
                f"({socket_info.describe()})"
            )
        taken[socket_info.fd] = name
        chosen[name] = socket_info
    unasked = [p for p in passed if p.fd not in taken]
    if unasked:
        asked = ", ".join(f"{options.get(n, n)} {specs[n].description}" for n in chosen) or "none"
        raise SystemdError(
            f"{PREFIX}: systemd passed socket(s) nobody asked for: "
            f"{_listing(unasked)} (listeners asking for systemd "
            f"sockets: {asked}); give each passed socket a listener option "
            f"(e.g. --port systemd:NAME) or remove its .socket unit from the service's Sockets="
        )
    sockets = OrderedDict()
    try:
        for name, info in chosen.items():
            try:
                sock = check_listening_socket(info.fd, socktype=specs[name].socktype)
            except ListenerError as e:
                raise SystemdError(
                    f"{options.get(name, '--port')} {specs[name].description}: {PREFIX}: "
                    f"{info.describe()}: {e}"
                )
            sockets[name] = sock
            set_receive_buffer(sock, specs[name])  # or ReceiveBuffer= in the .socket unit
            # systemd passes blocking sockets unless NonBlocking=yes; the flag is
            # on the shared open file description (docs/design.md, fact 2): setting it is
            # what every later generation needs too.
            sock.setblocking(False)
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    for info in passed:
        try:
            os.close(info.fd)
        except OSError:
            pass
    for variable in LISTEN_VARIABLES:
        environ.pop(variable, None)
    if real:
        _adopted = True
        _early = (_early[0], {})
    return sockets
