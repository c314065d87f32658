# The deploy a worker of tests/test_master_schedules_e2e.py starts with, read
# from the file beside this one, as a worker reads the code on disk.
import os

if os.environ.get("GRACEFUL_ROLE") == "worker":
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "deploy")) as _f:
        _fault = _f.read().strip()
    if _fault == "broken":
        os._exit(3)
    if _fault in ("never-ready", "dies-after-ready"):
        from twisted_graceful import service as _service

        _start = _service.GracefulService.startService

        def startService(self):
            if _fault == "never-ready":
                from twisted.internet import defer
                self.add_readiness_check(lambda: defer.Deferred())
            else:
                self.when_ready().addCallback(
                    lambda _: self.reactor.callLater(0.3, os._exit, 7))
            return _start(self)

        _service.GracefulService.startService = startService
