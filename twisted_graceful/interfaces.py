"""
What a third-party application plugs into twisted-graceful, declared the way
Twisted declares C{IProtocol} or C{IServiceMaker}: a class says
C{@implementer(IDrainableConnection)} and a test checks it with
C{zope.interface.verify.verifyObject}.

  - L{IDrainableConnection}: a connection of any protocol that the
    L{twisted_graceful.drain.DrainTracker} drains at its own transaction
    boundary (L{twisted_graceful.drain.DrainableConnection} is a base class
    that implements most of it);
  - L{IReadinessCheck}: something a new generation must prove before it is
    declared ready (L{twisted_graceful.service.GracefulService.add_readiness_check});
  - L{ILifecycleObserver}: hears the events a generation, or a master, goes
    through (L{twisted_graceful.service.GracefulService.add_observer}).

A plain function (a lambda) is accepted wherever a readiness check or an
observer is: it is a callable with the same signature, and declaring it is
optional (C{zope.interface.provider} on a function does it).
"""

from typing import Any, Callable

from zope.interface import Attribute, Interface

# What add_readiness_check and add_observer take, for type checkers: an
# IReadinessCheck or ILifecycleObserver, or a plain function.
ReadinessCheck = Callable[[], Any]
LifecycleObserver = Callable[..., None]


class IDrainableConnection(Interface):
    """
    One open connection that a L{twisted_graceful.drain.DrainTracker} knows
    (C{tracker.add(conn)} when it opens, C{tracker.remove(conn)} when it
    closes) and drains: the tracker decides I{when}, the connection knows
    I{how} to close at its own transaction boundary.
    """

    protocol_name = Attribute(
        "A short name for the protocol (C{'http'}, C{'txn'}): metrics, logs and "
        "the drain's progress lines count connections by it.")

    drain_state = Attribute(
        "C{'open'}; C{'closing'} once the tracker asked it to close at its boundary; "
        "C{'aborted'} once cut at the hard deadline. The tracker sets C{'closing'} "
        "and reads it when the connection is removed (closed by the server or by "
        "the client).")

    transport = Attribute(
        "The connection's C{ITransport}: cut with C{abortConnection()} when the reply "
        "to a commit that C{abort_connection} waited for never comes.")

    def in_transaction() -> bool:
        """
        True while closing now would lose or cut work: an HTTP request being
        handled, a transaction between its start and the reply to its commit.
        """

    def close_at_boundary(idle_grace: float) -> None:
        """
        Close at the next transaction boundary: when idle, after at most
        C{idle_grace} seconds (to answer a request already on its way);
        otherwise right after the reply that ends the current transaction.
        Remove yourself from the tracker once closed.
        """

    def abort_connection() -> bool:
        """
        The hard deadline: cut the connection and return True; or return
        False when a commit is in the database and its reply is on its way,
        and close right after that reply (cutting it would make the client
        retry work that was done).
        """

    def describe() -> str:
        """
        One line for an operator: the protocol, the peer, idle or in a
        transaction (logged for each connection cut at the deadline).
        """


class IReadinessCheck(Interface):
    """
    What a new generation proves before it says READY: its database answers,
    its caches are warm. Until every check has succeeded the previous
    generation keeps serving; a check that fails is retried with backoff
    until C{--ready-timeout}, and one that never answers fails then.
    """

    def __call__() -> Any:
        """
        @return: a L{twisted.internet.defer.Deferred} that fires once ready
            (or a plain value: ready at once); a failure (or an exception)
            means "not yet", with a reason the log shows.
        """


class ILifecycleObserver(Interface):
    """
    Hears every event of a generation's (or a master's) lifecycle: the
    vocabulary of L{twisted_graceful.lifecycle} (C{serving},
    C{upgrade-started}, C{upgrade-ok}, C{handed-over}, C{drained}, ...),
    each with C{pid}, C{generation} and C{state} besides its own details.
    An observer that raises is logged and does not stop the others.
    """

    def __call__(event: str, **details: Any) -> None:
        """
        @param event: the event's name (C{'upgrade-failed'}).
        @param details: its details (C{outcome=UpgradeOutcome(...)}).
        """


def require_callable(hook: Any, interface: Any) -> Any:
    """
    C{hook}, if it can be called as C{interface} says; a L{TypeError} naming
    the interface otherwise (at C{add_...} time, not at the first upgrade).
    """
    if not callable(hook):
        raise TypeError(f"{hook!r} is not callable: expected an {interface.__name__} "
                        f"(a function or an object with __call__)")
    return hook
