"""
Listening sockets that survive a generation change.

Every generation owns a raw listening socket (bound here, inherited from the
previous generation, or passed by systemd) and serves it through
C{reactor.adoptStreamPort}: a C{listenTCP} port would C{shutdown(2)} the shared
socket for every process when it stops (docs/design.md, fact 1). A datagram
(UDP) socket is bound the same way and served through
C{reactor.adoptDatagramPort}; a TLS listener is a TCP socket like any other,
which each generation wraps with the certificate it loaded when it started.

Each option takes the kinds that make sense for it (L{STREAM}, L{DATAGRAM},
L{TLS}): C{--udp-port tcp:514} is an error that says to use C{udp:}.
"""

import contextlib
import errno
import os
import resource
import socket
import stat
from dataclasses import dataclass


class ListenerError(Exception):
    """
    A listener cannot be described, bound or inherited; the message says which
    one and why, in words for an operator.
    """


class CertificateError(ListenerError):
    """
    A TLS listener's certificate or key cannot be used; the message names the
    option, the file and why. (Defined here so that catching it does not
    import pyOpenSSL; L{twisted_graceful.tls} raises it.)
    """


# What an option listens for: a stream socket (tcp:, tcp6:, unix:), a
# datagram socket (udp:) or a TCP socket serving TLS (ssl:); each also takes
# systemd:NAME, a socket of that type passed by systemd.
STREAM = "stream"
DATAGRAM = "datagram"
TLS = "tls"
_ROLE_KINDS = {
    STREAM: ("tcp", "tcp6", "unix", "systemd"),
    DATAGRAM: ("udp", "systemd"),
    TLS: ("ssl", "systemd"),
}
_ROLE_FORMS = {
    STREAM: "a port number, tcp:PORT, tcp6:PORT, unix:PATH or systemd:NAME",
    DATAGRAM: "a port number, udp:PORT[:interface=ADDR][:rcvbuf=BYTES] or systemd:NAME",
    TLS: ("a port number, ssl:PORT:privateKey=KEY.pem:certKey=CERT.pem[:interface=ADDR] or "
          "systemd:NAME:privateKey=KEY.pem:certKey=CERT.pem"),
}
_ROLE_OPTIONS = {STREAM: "--port", DATAGRAM: "--udp-port", TLS: "--tls-port"}
# Twisted's ssl: endpoint keywords (twisted.internet.endpoints, _parseSSL).
TLS_KEYWORDS = ("privateKey", "certKey", "sslmethod", "extraCertChain", "dhParameters")


@dataclass(frozen=True)
class ListenSpec:
    """
    What to listen on, parsed from a port number or an endpoint-style
    description (C{tcp:8080}, C{tcp:8080:interface=127.0.0.1}, C{tcp6:8080},
    C{unix:/run/app.sock}).
    """

    description: str
    kind: str  # "tcp", "tcp6", "unix", "udp", "ssl" or "systemd"
    host: str = ""
    port: int = 0
    path: str = ""
    backlog: int = 128
    mode: int = 0o666
    name: str = ""  # systemd: the socket's FileDescriptorName
    index: int = -1  # systemd: position when unnamed
    role: str = STREAM  # STREAM, DATAGRAM or TLS
    tls: tuple = ()  # TLS: Twisted's ssl: keywords, (name, value) pairs
    rcvbuf: int = 0  # DATAGRAM: SO_RCVBUF in bytes (0: the system's default)

    @property
    def family(self):
        if self.kind in ("tcp", "ssl"):
            return socket.AF_INET
        if self.kind == "tcp6":
            return socket.AF_INET6
        if self.kind == "unix":
            return socket.AF_UNIX
        if self.kind == "udp":
            return socket.AF_INET6 if ":" in self.host else socket.AF_INET
        return None

    @property
    def socktype(self):
        return socket.SOCK_DGRAM if self.role == DATAGRAM else socket.SOCK_STREAM

    @property
    def expects(self):
        """
        What an inherited or passed socket must be: (family or L{None}, type).
        """
        return (self.family, self.socktype)


_KINDS = ("tcp", "tcp6", "unix", "systemd", "udp", "ssl")


def _split_description(description):
    # Endpoint strings escape colons with a backslash (tcp6:8080:interface=\:\:1).
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_listen_description(description, option="--port", role=STREAM):
    """
    Parse C{description} into a L{ListenSpec}; raise L{ListenerError} naming
    C{option} for anything that is not a listener we can own.

    @param role: L{STREAM} (the default), L{DATAGRAM} or L{TLS}: which kinds
        of socket C{option} takes.
    """
    text = str(description).strip()
    if not text:
        raise ListenerError(f"{option}: empty listener description")
    if text.isdigit():
        text = {STREAM: "tcp:", DATAGRAM: "udp:", TLS: "ssl:"}[role] + text
    parts = _split_description(text)
    kind = parts[0].lower()
    if kind not in _ROLE_KINDS[role]:
        other = [r for r, kinds in _ROLE_KINDS.items() if kind in kinds and r != role]
        hint = f" ({_ROLE_OPTIONS[other[0]]} takes {kind}:)" if other else ""
        raise ListenerError(
            f"{option} {description!r}: unsupported listener type {parts[0]!r}{hint}; "
            f"use {_ROLE_FORMS[role]}"
        )
    positional = [p for p in parts[1:] if "=" not in p]
    if len(positional) > 1:
        # Twisted's endpoints read a second positional as the interface
        # (tcp:8080:127.0.0.1); ignoring it would listen on every interface.
        raise ListenerError(
            f"{option} {description!r}: unexpected parameter(s) "
            f"{', '.join(repr(p) for p in positional[1:])}; use keyword=value"
        )
    keywords = {}
    for p in parts[1:]:
        if "=" in p:
            key, _, value = p.partition("=")
            keywords[key.strip()] = value
    try:
        backlog = int(keywords.pop("backlog", 128))
        if backlog < 1:
            raise ValueError(backlog)
    except ValueError:
        raise ListenerError(f"{option} {description!r}: backlog must be a positive integer")
    tls = ()
    if role == TLS:
        tls = tuple((key, keywords.pop(key)) for key in TLS_KEYWORDS if key in keywords)
    rcvbuf = 0
    if role == DATAGRAM and "rcvbuf" in keywords:
        # The one queue every generation reads: what arrives while none reads
        # (a loaded machine, an upgrade) waits there; beyond it, the kernel drops.
        text = keywords.pop("rcvbuf")
        try:
            rcvbuf = int(text)
            if not 0 < rcvbuf < 2**31:
                raise ValueError(rcvbuf)
        except ValueError:
            raise ListenerError(f"{option} {description!r}: rcvbuf must be a number of bytes, "
                                f"not {text!r}")

    if kind == "udp":
        port, host = _port_and_host(option, description, keywords, positional, "0.0.0.0")
        _reject_unknown(option, description, keywords)
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             host.partition("%")[0])
        except OSError:
            raise ListenerError(f"{option} {description!r}: {host!r} is not an IPv4 or IPv6 "
                                f"address")
        return ListenSpec(text, kind, host=host, port=port, role=role, rcvbuf=rcvbuf)

    if kind == "ssl":
        port, host = _port_and_host(option, description, keywords, positional, "0.0.0.0")
        _reject_unknown(option, description, keywords)
        try:
            socket.inet_pton(socket.AF_INET, host)
        except OSError:
            raise ListenerError(f"{option} {description!r}: {host!r} is not an IPv4 address")
        return ListenSpec(text, kind, host=host, port=port, backlog=backlog, role=role, tls=tls)

    if kind in ("tcp", "tcp6"):
        port, host = _port_and_host(option, description, keywords, positional,
                                    "::" if kind == "tcp6" else "0.0.0.0")
        _reject_unknown(option, description, keywords)
        if kind == "tcp6":
            # A tcp6 listener on an IPv4-looking or named interface is a mistake
            # (a scope suffix, fe80::1%eth0, is left to bind()).
            try:
                socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
            except OSError:
                raise ListenerError(f"{option} {description!r}: {host!r} is not an IPv6 address")
        if kind == "tcp":
            try:
                socket.inet_pton(socket.AF_INET, host)
            except OSError:
                raise ListenerError(f"{option} {description!r}: {host!r} is not an IPv4 address")
        return ListenSpec(text, kind, host=host, port=port, backlog=backlog)

    if kind == "unix":
        path = keywords.pop("address", positional[0] if positional else "")
        if not path:
            raise ListenerError(f"{option} {description!r}: unix: needs a socket path")
        mode_text = keywords.pop("mode", "666")
        keywords.pop("lockfile", None)
        try:
            mode = int(mode_text, 8)
        except ValueError:
            raise ListenerError(f"{option} {description!r}: mode must be octal, not {mode_text!r}")
        _reject_unknown(option, description, keywords)
        return ListenSpec(text, kind, path=os.path.abspath(path), backlog=backlog, mode=mode)

    # systemd:NAME, systemd:name=NAME, systemd:domain=INET:index=0
    keywords.pop("domain", None)
    name = keywords.pop("name", positional[0] if positional else "")
    index_text = keywords.pop("index", "")
    _reject_unknown(option, description, keywords)
    index = -1
    if index_text:
        try:
            index = int(index_text)
            if index < 0:
                raise ValueError(index)
        except ValueError:
            raise ListenerError(f"{option} {description!r}: index must be a number >= 0")
    if not name and index < 0:
        raise ListenerError(f"{option} {description!r}: systemd: needs a socket name or index=N")
    return ListenSpec(text, "systemd", name=name, index=index, backlog=backlog, role=role,
                      tls=tls, rcvbuf=rcvbuf)


def _port_and_host(option, description, keywords, positional, default_host):
    port_text = keywords.pop("port", positional[0] if positional else "")
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError(port)
    except ValueError:
        raise ListenerError(
            f"{option} {description!r}: port must be a number from 0 to 65535, "
            f"not {port_text!r}"
        )
    return port, keywords.pop("interface", "") or default_host


def _reject_unknown(option, description, keywords):
    if keywords:
        raise ListenerError(
            f"{option} {description!r}: unknown parameter(s) {', '.join(sorted(keywords))}"
        )


def bind_listener(spec, option="--port", reuse_port=False):
    """
    Bind and listen on a fresh non-blocking socket for C{spec}.
    """
    family = spec.family
    sock = socket.socket(family, spec.socktype)
    try:
        if family == socket.AF_UNIX:
            _remove_stale_unix_socket(spec, option)
            sock.bind(spec.path)
            os.chmod(spec.path, spec.mode)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((spec.host, spec.port))
        set_receive_buffer(sock, spec)
        if spec.socktype == socket.SOCK_STREAM:
            sock.listen(spec.backlog)
        # A datagram socket needs no listen(): bound, it receives; every
        # generation reading it reads the one queue.
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        where = spec.path if family == socket.AF_UNIX else f"{spec.host} port {spec.port}"
        reason = e.strerror or str(e)
        if e.errno == errno.EADDRINUSE:
            reason = ("address already in use (is another server running there? stop it or "
                      "choose another address)")
        raise ListenerError(f"{option} {spec.description}: cannot listen on {where}: {reason}")
    return sock


def set_receive_buffer(sock, spec):
    """
    Give a datagram socket the receive buffer C{spec} asks for (C{rcvbuf=};
    the kernel caps it at C{net.core.rmem_max}). It is the socket's, so every
    process holding it shares it: set once, by the first generation.
    """
    if spec.rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, spec.rcvbuf)


def _remove_stale_unix_socket(spec, option):
    try:
        st = os.stat(spec.path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(
            f"{option} {spec.description}: {spec.path} exists and is not a socket; "
            f"refusing to replace it"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(spec.path)
    except OSError:
        os.unlink(spec.path)  # nobody listens: a leftover from a stopped server
    else:
        raise ListenerError(
            f"{option} {spec.description}: cannot listen on {spec.path}: "
            f"address already in use (is another server running there?)"
        )
    finally:
        probe.close()


def fd_limit():
    """
    How many file descriptors this process may have (C{RLIMIT_NOFILE}): every
    fd it holds is below this number, so an fd number or a count of fds read
    from the environment is bounded by it before anything is built from it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (soft, hard):
        if limit != resource.RLIM_INFINITY and limit > 0:
            return limit
    return 2**31 - 1  # an fd is a C int


def shorten(text, limit=60):
    """
    C{text} as quoted in an error message (a string quoted, a number as is):
    at most C{limit} characters of it.
    """
    show = repr if isinstance(text, str) else str
    text = str(text)
    if len(text) <= limit:
        return show(text)
    return show(text[:limit]) + f"... ({len(text)} characters)"


@contextlib.contextmanager
def wrapping_nonblocking():
    """
    Socket objects made in this block around an existing descriptor
    (C{socket.socket(fileno=...)}, C{socket.fromfd}, Twisted's
    C{adoptStreamPort}) are non-blocking from the start.

    PyPy applies the default timeout to a descriptor it wraps: with the
    default (L{None}) it clears C{O_NONBLOCK}, on the open file description
    that every process holding the socket shares (docs/design.md, facts 2 and
    44). A listening socket wrapped so in a new generation blocks the
    accept loop of every process serving it: C{accept()} waits in the
    kernel for the next connection instead of answering C{EAGAIN}, and the
    connections already accepted are never read. CPython leaves the flag
    alone unless a default timeout is set. A default timeout of 0 makes
    both set C{O_NONBLOCK} (what Twisted's ports need) and neither ever
    clear it, not even for an instant.

    Called only while a generation starts, before the reactor runs (so no
    other thread makes sockets meanwhile); the previous default is put back.
    """
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0.0)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def check_listening_socket(fd, family=None, socktype=socket.SOCK_STREAM):
    """
    Return a non-blocking socket object (a dup of C{fd}) if C{fd} is a
    listening stream socket, or with C{socktype} C{SOCK_DGRAM} a bound
    datagram socket (of C{family}, when given); else raise L{ListenerError}.
    The caller's descriptor is left open, and non-blocking (the flag is
    shared with the dup; see L{wrapping_nonblocking}).
    """
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise ListenerError(f"fd {fd} is not open ({e.strerror})")
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"fd {fd} is not a socket")
    with wrapping_nonblocking():
        sock = socket.socket(fileno=os.dup(fd))
    try:
        if socktype == socket.SOCK_DGRAM:
            _check_datagram(fd, sock)
        elif sock.type == socket.SOCK_DGRAM:
            raise ListenerError(f"fd {fd} is a datagram (UDP) socket, not a stream socket "
                                f"(datagram sockets go to --udp-port)")
        elif sock.type != socket.SOCK_STREAM:
            raise ListenerError(f"fd {fd} is not a stream socket")
        elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ListenerError(f"fd {fd} is a socket that is not listening")
        if family is not None and sock.family != family:
            raise ListenerError(
                f"fd {fd} is a {_family_name(sock.family)} socket, "
                f"expected {_family_name(family)}"
            )
    except BaseException:
        sock.close()
        raise
    return sock


def _check_datagram(fd, sock):
    if sock.type == socket.SOCK_STREAM:
        raise ListenerError(f"fd {fd} is a stream socket, not a datagram (UDP) socket "
                            f"(stream sockets go to --port, --txn-port, --tls-port)")
    if sock.type != socket.SOCK_DGRAM:
        raise ListenerError(f"fd {fd} is not a datagram socket")
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ListenerError(f"fd {fd} is a {_family_name(sock.family)} datagram socket, "
                            f"expected UDP (IPv4 or IPv6)")
    if sock.getsockname()[1] == 0:
        raise ListenerError(f"fd {fd} is a datagram socket that is not bound to a port")


def _family_name(family):
    return {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6", socket.AF_UNIX: "UNIX"}.get(
        family, str(family)
    )


def describe_socket(sock):
    """
    A short human description of where C{sock} listens.
    """
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    if sock.type == socket.SOCK_DGRAM:
        host = f"[{name[0]}]" if sock.family == socket.AF_INET6 else name[0]
        return f"udp:{host}:{name[1]}"
    if sock.family == socket.AF_INET6:
        return f"tcp6:[{name[0]}]:{name[1]}"
    return f"tcp:{name[0]}:{name[1]}"


def address_mismatch(spec, sock):
    """
    Where C{sock} listens, if that is not what C{spec} asks for (a port of 0
    matches any port); else L{None}. A running server cannot move a listener:
    the new address needs a restart, not an upgrade.
    """
    if spec.kind == "systemd":
        return None
    name = sock.getsockname()
    if spec.kind == "unix":
        path = name.decode() if isinstance(name, bytes) else name
        return None if os.path.abspath(path) == spec.path else describe_socket(sock)
    host, port = name[0], name[1]
    wanted_host = spec.host
    try:
        same_host = socket.inet_pton(sock.family, host) == socket.inet_pton(sock.family,
                                                                            wanted_host)
    except OSError:
        same_host = host == wanted_host
    if not same_host or (spec.port and port != spec.port):
        return describe_socket(sock)
    return None

