"""
twisted-graceful: zero-downtime restarts and upgrades for Twisted servers.
"""

from twisted_graceful.drain import DrainableConnection, DrainTracker
from twisted_graceful.http import GracefulSite, self_test_request
from twisted_graceful.listeners import ListenerError, parse_listen_description
from twisted_graceful.service import GracefulService, Inheritance

__version__ = "0.1.0"

__all__ = [
    "DrainableConnection",
    "DrainTracker",
    "GracefulService",
    "GracefulSite",
    "Inheritance",
    "ListenerError",
    "parse_listen_description",
    "self_test_request",
]
