"""
twisted-graceful: zero-downtime restarts and upgrades for Twisted servers.

The names below are imported when first used (PEP 562): a master, which
serves nothing, never imports twisted.web through this package
(docs/design.md, "Start-up cost").
"""

# First: keeps a copy of LISTEN_PID/LISTEN_FDS before anything imports
# twisted.internet.endpoints, which deletes them (docs/design.md, fact 7).
from twisted_graceful import systemd as _systemd  # noqa: F401,I001

__version__ = "0.1.0"

# name -> the module that defines it.
_LAZY = {
    "DrainableConnection": "twisted_graceful.drain",
    "DrainTracker": "twisted_graceful.drain",
    "GracefulService": "twisted_graceful.service",
    "GracefulSite": "twisted_graceful.http",
    "HTTPSelfTest": "twisted_graceful.http",
    "IDrainableConnection": "twisted_graceful.interfaces",
    "ILifecycleObserver": "twisted_graceful.interfaces",
    "IReadinessCheck": "twisted_graceful.interfaces",
    "Inheritance": "twisted_graceful.inherit",
    "ListenerError": "twisted_graceful.listeners",
    "parse_listen_description": "twisted_graceful.listeners",
    "self_test_request": "twisted_graceful.http",
}

__all__ = sorted(_LAZY, key=str.lower)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
