"""
The HTTP side of the C{graceful} server: C{hello world} with its PID, slow
requests with a heartbeat, and C{/healthz} for load balancers.
"""

import ipaddress
import os

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web import resource, server

from twisted_graceful.slow import SlowWork, heartbeat


class ServerIdentity:
    """
    Who is answering: the PID (read live: twistd may daemonize after the
    service is built) and the generation.

    Its text (C{str}, in every C{GET /} answer) is kept once the service
    runs: by then both are final (twistd daemonizes, a fork, before it
    starts the service; the generation is read when the service starts, and
    a generation is one process). Building it per request cost two property
    reads and a format, about 6,000 instructions (docs/benchmarks.md).
    """

    _text = None

    def __init__(self, graceful_service):
        self._service = graceful_service

    @property
    def pid(self):
        return os.getpid()

    @property
    def generation(self):
        return self._service.generation

    @property
    def draining(self):
        # Handed over, shutting down, or inside the shutdown delay.
        return self._service.draining

    def __str__(self):
        text = self._text
        if text is None:
            text = f"pid {self.pid} (generation {self.generation})"
            if getattr(self._service, "running", False):
                self._text = text
        return text


class SlowRequest:
    """
    Answer C{request} after C{seconds} of L{SlowWork}.
    """

    def __init__(self, reactor, identity, request, seconds, number, emit=heartbeat):
        self.identity = identity
        self.request = request
        self.seconds = seconds
        self.work = SlowWork(reactor, identity.pid, seconds, number, emit, what="request")

    def start(self):
        self.request.notifyFinish().addErrback(lambda _: self.work.client_gone())
        self.work.start().addCallback(self._answer)
        return server.NOT_DONE_YET

    def _answer(self, _):
        body = f"hello world from {self.identity} after a slow request of {self.seconds} s\n"
        self.request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        self.request.setHeader(b"content-length", b"%d" % len(body.encode()))
        self.request.write(body.encode())
        self.request.finish()


class HelloResource(resource.Resource):
    """
    C{GET /}: C{hello world from pid N (generation G)}; every C{slow_every}th
    such request is slow.
    """

    isLeaf = False

    def __init__(self, reactor, identity, slow_every=10, slow_seconds=10.0, emit=heartbeat,
                 store=None, allow_remote_writes=False, max_line=8192):
        resource.Resource.__init__(self)
        self.reactor = reactor
        self.identity = identity
        self.slow_every = slow_every
        self.slow_seconds = slow_seconds
        self.emit = emit
        self.count = 0
        self.slow_count = 0
        self.putChild(b"slow", SlowResource(self))
        self.putChild(b"healthz", HealthResource(identity, store))
        if store is not None:
            self.putChild(b"kv", KVResource(store, allow_remote_writes, max_line))

    def getChild(self, path, request):
        if path == b"":
            return self
        return resource.NoResource(f"No such page: /{path.decode('utf-8', 'replace')}")

    def render_GET(self, request):
        self.count += 1
        if self.slow_every and self.count % self.slow_every == 0:
            return self.slow(request, self.slow_seconds)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"hello world from {self.identity}\n".encode()

    render_HEAD = render_GET

    def slow(self, request, seconds):
        self.slow_count += 1
        return SlowRequest(
            self.reactor, self.identity, request, seconds, self.slow_count, self.emit
        ).start()


class SlowResource(resource.Resource):
    """
    C{GET /slow?seconds=S}: one slow request on demand.
    """

    isLeaf = True
    MAX_SECONDS = 3600

    def __init__(self, hello):
        resource.Resource.__init__(self)
        self.hello = hello

    def render_GET(self, request):
        raw = request.args.get(b"seconds", [str(self.hello.slow_seconds).encode()])[0]
        try:
            seconds = float(raw)
            if not 0 <= seconds <= self.MAX_SECONDS:
                raise ValueError(seconds)
        except ValueError:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return (
                f"seconds must be a number from 0 to {self.MAX_SECONDS}, "
                f"not {raw.decode('utf-8', 'replace')!r}\n"
            ).encode()
        return self.hello.slow(request, seconds)

    # A slow POST: a non-idempotent request that must be answered exactly once.
    render_POST = render_GET


class HealthResource(resource.Resource):
    """
    C{GET /healthz}: 200 C{serving} while this process accepts, 503
    C{draining} once it drains, so a load balancer stops routing to it; 503
    too when its store cannot be written (its file lost, or read-only).
    """

    isLeaf = True

    def __init__(self, identity, store=None):
        resource.Resource.__init__(self)
        self.identity = identity
        self.store = store

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self.identity.draining:
            request.setResponseCode(503)
            return f"draining {self.identity}\n".encode()
        problem = getattr(self.store, "unusable", lambda: None)()
        if problem:
            request.setResponseCode(503)
            return f"store unusable {self.identity}: {_one_line(problem)}\n".encode()
        return f"serving {self.identity}\n".encode()

    render_HEAD = render_GET


def _one_line(text):
    return " ".join(str(text).split())


def is_local(address):
    """
    Is C{address} (a request's client address) this host: a loopback IP
    (127.0.0.0/8, ::1, ::ffff:127.x.y.z) or a UNIX socket?
    """
    if isinstance(address, UNIXAddress):
        return True
    if isinstance(address, (IPv4Address, IPv6Address)):
        try:
            ip = ipaddress.ip_address(address.host.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)
        return ip.is_loopback or (mapped is not None and mapped.is_loopback)
    return False


def _word_problem(what, text):
    """
    Why C{text} cannot be a key or a value of the line protocol (one word,
    no control characters), or L{None}.
    """
    if not text:
        return f"the {what} is empty"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in text):
        return (f"the {what} must be one word: no spaces, tabs, line breaks or control "
                f"characters (the transaction protocol could not read it back)")
    return None


class KVResource(resource.Resource):
    """
    C{GET /kv/<key>}: the committed value of C{key} in the store the
    transaction protocol writes (404 if there is none), so both protocols
    share one state.

    C{POST} writes. It is refused (403) to a client that is not on this host
    unless C{allow_remote_writes}; a value must be one the transaction
    protocol could have set (C{SET key value} within C{max_line} bytes, one
    word): 413 if longer, 400 otherwise.
    """

    isLeaf = True
    MAX_KEY_LENGTH = 250  # as the transaction protocol's

    def __init__(self, store, allow_remote_writes=False, max_line=8192):
        resource.Resource.__init__(self)
        self.store = store
        self.allow_remote_writes = allow_remote_writes
        self.max_line = max_line

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        try:
            key = b"/".join(request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            request.setResponseCode(400)
            return b"the key is not valid UTF-8\n"
        if not key:
            request.setResponseCode(400)
            return b"GET /kv/<key> needs a key\n"
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def answer(value):
            if gone:
                return
            if value is None:
                request.setResponseCode(404)
                request.write(f"no such key: {key}\n".encode())
            else:
                request.write(f"{value}\n".encode())
            request.finish()

        def failed(failure):
            if gone:
                return
            request.setResponseCode(503)
            request.write(f"store unavailable: {failure.getErrorMessage()}\n".encode())
            request.finish()

        self.store.get(key).addCallbacks(answer, failed)
        return server.NOT_DONE_YET

    def render_POST(self, request):
        """
        C{POST /kv/<key>} with a form body C{incr=N} or C{value=V}: one
        committed transaction, answered with its txid once it is committed
        (a non-idempotent request, for checking nothing is applied twice).

        With an C{Idempotency-Key} header (the IETF httpapi draft's), at most
        once: a client that lost the response (a cut connection, a killed
        worker) sends the same request again and gets the first commit's
        response again, marked C{Idempotent-Replayed: true}; the same key with
        another write is 422.
        """
        from twisted_graceful.store import (
            CommitOutcomeUnknown,
            KeyReused,
            StoreUnusable,
            TransactionFailed,
            idempotency_key_problem,
            parse_integer,
        )

        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        client = request.getClientAddress()
        if not self.allow_remote_writes and not is_local(client):
            request.setResponseCode(403)
            host = getattr(client, "host", client)
            return (f"writes are accepted from this host only, not from {host}; start the "
                    f"server with --allow-remote-writes to accept them from the network\n"
                    ).encode()
        try:
            key = b"/".join(request.postpath).decode("utf-8")
            args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        except UnicodeDecodeError:
            request.setResponseCode(400)
            return b"the key and the form must be valid UTF-8\n"
        if not key:
            request.setResponseCode(400)
            return b"POST /kv/<key> needs a key\n"
        problem = _word_problem("key", key)
        if problem is None and len(key) > self.MAX_KEY_LENGTH:
            problem = f"the key is longer than {self.MAX_KEY_LENGTH} characters"
        if problem is None and "value" in args and "incr" not in args:
            problem = _word_problem("value", args["value"])
            if problem is None:
                longest = self.max_line - len(f"SET {key} ".encode())
                if len(args["value"].encode()) > longest:
                    request.setResponseCode(413)
                    return (f"the value is longer than the transaction protocol allows for "
                            f"this key ({max(longest, 0)} bytes: SET key value within "
                            f"--max-line {self.max_line}); nothing stored\n").encode()
        if problem is not None:
            request.setResponseCode(400)
            return f"{problem}; nothing stored\n".encode()
        if "incr" in args and parse_integer(args["incr"]) is not None:
            ops = [("incr", key, parse_integer(args["incr"]))]
        elif "value" in args and "incr" not in args:
            ops = [("set", key, args["value"])]
        else:
            request.setResponseCode(400)
            return b"POST /kv/<key> needs a form body incr=<integer> or value=<text>\n"
        idempotency_key = request.getHeader(b"idempotency-key")
        if idempotency_key is not None:
            # A structured-field string ("...") or a bare token.
            idempotency_key = idempotency_key.decode("latin-1").strip()
            if len(idempotency_key) >= 2 and idempotency_key[0] == idempotency_key[-1] == '"':
                idempotency_key = idempotency_key[1:-1]
            problem = idempotency_key_problem(idempotency_key)
            if problem is not None:
                request.setResponseCode(400)
                return f"Idempotency-Key: {problem}; nothing stored\n".encode()
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def committed(result):
            request.committing = False
            if not gone:
                if result.replayed:
                    request.setHeader(b"idempotent-replayed", b"true")
                request.write(f"committed txid={result.txid} {key}={result.values[key]}\n".encode())
                request.finish()

        def failed(failure):
            request.committing = False
            if gone:
                return
            message = _one_line(failure.getErrorMessage())
            if failure.check(KeyReused):
                request.setResponseCode(422)
                text = f"not committed: {message}"
            elif failure.check(TransactionFailed):
                request.setResponseCode(409)
                text = f"not committed: {message}"
            elif failure.check(StoreUnusable):
                request.setResponseCode(500)
                text = f"not committed: database unusable ({message}); will not succeed on retry"
            else:
                request.setResponseCode(503)
                if failure.check(CommitOutcomeUnknown):
                    text = f"outcome unknown: {message}"
                else:
                    request.setHeader(b"retry-after", b"1")
                    text = f"not committed: {message}; try again"
            request.write(f"{text}\n".encode())
            request.finish()

        # Marked for the drain's hard deadline: cutting the connection now
        # would hide a commit that happens anyway.
        request.committing = True
        self.store.commit(ops, idempotency_key=idempotency_key).addCallbacks(committed, failed)
        return server.NOT_DONE_YET
