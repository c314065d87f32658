"""
Slow work on purpose, as in the seed: a request or transaction that takes a
while and says so every second, naming its PID, so a person watching an
upgrade sees the old process finish what it started while the new one serves.
"""

from twisted.internet import defer, task


def heartbeat(message):
    print(message, flush=True)


class SlowWork:
    """
    Take C{seconds}, emitting a heartbeat line every second.

    @param what: what is slow ("request", "transaction"), for the lines.
    """

    def __init__(self, reactor, pid, seconds, number, emit=heartbeat, what="request"):
        self.reactor = reactor
        self.pid = pid
        self.seconds = seconds
        self.number = number
        self.emit = emit
        self.name = f"pid {pid}: slow {what} #{number}"
        self.elapsed = 0
        self._loop = None
        self._call = None
        self._done = defer.Deferred()

    def start(self):
        """
        @return: a Deferred firing when the time is up (never, if the client
            went away first).
        """
        self.emit(f"{self.name} started ({self.seconds:g} s)")
        if self.seconds >= 1:
            self._loop = task.LoopingCall(self._beat)
            self._loop.clock = self.reactor
            self._loop.start(1.0, now=False)
        self._call = self.reactor.callLater(self.seconds, self._finish)
        return self._done

    def _beat(self):
        self.elapsed += 1
        if self.elapsed <= self.seconds:
            self.emit(f"{self.name} {self.elapsed}/{int(self.seconds)} s")

    def _stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._call is not None and self._call.active():
            self._call.cancel()

    def _finish(self):
        self._stop()
        self.emit(f"{self.name} done")
        self._done.callback(None)

    def client_gone(self):
        if self._done.called:
            return
        self._stop()
        self.emit(f"{self.name}: client went away")
