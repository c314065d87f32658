"""
twisted-graceful: zero-downtime restarts and upgrades for Twisted servers.
"""

# First: keeps a copy of LISTEN_PID/LISTEN_FDS before anything imports
# twisted.internet.endpoints, which deletes them (docs/design.md, fact 7).
from twisted_graceful import systemd as _systemd  # noqa: F401,I001
from twisted_graceful.drain import DrainableConnection, DrainTracker
from twisted_graceful.http import GracefulSite, HTTPSelfTest, self_test_request
from twisted_graceful.listeners import ListenerError, parse_listen_description
from twisted_graceful.inherit import Inheritance
from twisted_graceful.interfaces import IDrainableConnection, ILifecycleObserver, IReadinessCheck
from twisted_graceful.service import GracefulService

__version__ = "0.1.0"

__all__ = [
    "DrainableConnection",
    "DrainTracker",
    "GracefulService",
    "GracefulSite",
    "HTTPSelfTest",
    "IDrainableConnection",
    "ILifecycleObserver",
    "IReadinessCheck",
    "Inheritance",
    "ListenerError",
    "parse_listen_description",
    "self_test_request",
]
