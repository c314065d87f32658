"""
The HTTP side of the C{graceful} server: C{hello world} with its PID, slow
requests with a heartbeat, and C{/healthz} for load balancers.
"""

import os

from twisted.web import resource, server

from twisted_graceful.slow import SlowWork, heartbeat


class ServerIdentity:
    """
    Who is answering: the PID (read live: twistd may daemonize after the
    service is built) and the generation.
    """

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
        return f"pid {self.pid} (generation {self.generation})"


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
                 store=None):
        resource.Resource.__init__(self)
        self.reactor = reactor
        self.identity = identity
        self.slow_every = slow_every
        self.slow_seconds = slow_seconds
        self.emit = emit
        self.count = 0
        self.slow_count = 0
        self.putChild(b"slow", SlowResource(self))
        self.putChild(b"healthz", HealthResource(identity))
        if store is not None:
            self.putChild(b"kv", KVResource(store))

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
    C{draining} once it drains, so a load balancer stops routing to it.
    """

    isLeaf = True

    def __init__(self, identity):
        resource.Resource.__init__(self)
        self.identity = identity

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self.identity.draining:
            request.setResponseCode(503)
            return f"draining {self.identity}\n".encode()
        return f"serving {self.identity}\n".encode()

    render_HEAD = render_GET


class KVResource(resource.Resource):
    """
    C{GET /kv/<key>}: the committed value of C{key} in the store the
    transaction protocol writes (404 if there is none), so both protocols
    share one state.
    """

    isLeaf = True

    def __init__(self, store):
        resource.Resource.__init__(self)
        self.store = store

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
        """
        from twisted_graceful.store import CommitOutcomeUnknown, TransactionFailed, parse_integer

        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        try:
            key = b"/".join(request.postpath).decode("utf-8")
            args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        except UnicodeDecodeError:
            request.setResponseCode(400)
            return b"the key and the form must be valid UTF-8\n"
        if not key:
            request.setResponseCode(400)
            return b"POST /kv/<key> needs a key\n"
        if "incr" in args and parse_integer(args["incr"]) is not None:
            ops = [("incr", key, parse_integer(args["incr"]))]
        elif "value" in args and "incr" not in args:
            ops = [("set", key, args["value"])]
        else:
            request.setResponseCode(400)
            return b"POST /kv/<key> needs a form body incr=<integer> or value=<text>\n"
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def committed(result):
            request.committing = False
            if not gone:
                request.write(f"committed txid={result.txid} {key}={result.values[key]}\n".encode())
                request.finish()

        def failed(failure):
            request.committing = False
            if gone:
                return
            if failure.check(TransactionFailed):
                request.setResponseCode(409)
            else:
                request.setResponseCode(503)
            if failure.check(CommitOutcomeUnknown):
                request.write(f"outcome unknown: {failure.getErrorMessage()}\n".encode())
            else:
                request.write(f"not committed: {failure.getErrorMessage()}\n".encode())
            request.finish()

        # Marked for the drain's hard deadline: cutting the connection now
        # would hide a commit that happens anyway.
        request.committing = True
        self.store.commit(ops).addCallbacks(committed, failed)
        return server.NOT_DONE_YET
