"""
Run the unit tests or the end-to-end tests alone (the matrix in tox.ini runs
the slow end-to-end modules only on the oldest and the newest Python).

    python -m tests.run unit [trial options]
    python -m tests.run e2e [trial options]

An end-to-end module is named C{tests/test_*_e2e.py}: it starts real twistd
processes. Every other C{tests/test_*.py} is a unit module.
"""

import glob
import os
import sys

KINDS = ("unit", "e2e")


def modules(kind, directory=os.path.dirname(os.path.abspath(__file__))):
    """
    The dotted names of the test modules of one kind, sorted.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind of test {kind!r}: expected one of {', '.join(KINDS)}")
    names = sorted(
        os.path.splitext(os.path.basename(path))[0]
        for path in glob.glob(os.path.join(directory, "test_*.py"))
    )
    e2e = [name for name in names if name.endswith("_e2e")]
    chosen = e2e if kind == "e2e" else [name for name in names if name not in e2e]
    return [f"tests.{name}" for name in chosen]


def main(argv):
    if not argv or argv[0] not in KINDS:
        sys.stderr.write(f"usage: python -m tests.run {{{'|'.join(KINDS)}}} [trial options]\n")
        return 2
    from twisted.scripts.trial import run

    sys.argv = ["trial"] + argv[1:] + modules(argv[0])
    run()  # exits with trial's status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
