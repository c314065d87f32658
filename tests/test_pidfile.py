"""
Unit tests of L{twisted_graceful.pidfile}: the pidfile follows the live
generation.
"""

import os
import tempfile

from twisted.scripts import _twistd_unix
from twisted.trial.unittest import SynchronousTestCase

from twisted_graceful import _twisted
from twisted_graceful._twisted import protect_twistd_pidfile
from twisted_graceful.pidfile import (
    read_pid,
    remove_pidfile_if_own,
    write_pidfile,
)


class PidfileTestCase(SynchronousTestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp()
        self.addCleanup(_rmtree, self.directory)
        self.path = os.path.join(self.directory, "twistd.pid")

    def write(self, content):
        with open(self.path, "w") as f:
            f.write(content)


class WritePidfileTests(PidfileTestCase):
    def test_contentIsThePid(self):
        write_pidfile(self.path, 4242)
        with open(self.path) as f:
            self.assertEqual(f.read(), "4242\n")

    def test_noTemporaryFileLeft(self):
        write_pidfile(self.path, 4242)
        self.assertEqual(os.listdir(self.directory), ["twistd.pid"])

    def test_replacesExistingFile(self):
        self.write("1\n")
        write_pidfile(self.path, 4242)
        self.assertEqual(read_pid(self.path), 4242)

    def test_atomicReplace(self):
        """
        The pidfile is written to a temporary file in the same directory and
        renamed over the old one with C{os.replace}: a reader never sees a
        half-written pidfile.
        """
        self.write("1\n")
        calls = []
        original = os.replace

        def replace(src, dst):
            with open(src) as f:
                calls.append((os.path.dirname(src), dst, f.read()))
            with open(dst) as f:
                self.assertEqual(f.read(), "1\n")  # untouched until the rename
            original(src, dst)

        self.patch(os, "replace", replace)
        write_pidfile(self.path, 4242)
        self.assertEqual(calls, [(self.directory, self.path, "4242\n")])

    def test_roundTripsWithReadPid(self):
        write_pidfile(self.path, os.getpid())
        self.assertEqual(read_pid(self.path), os.getpid())


class ReadPidTests(PidfileTestCase):
    def test_missingFile(self):
        self.assertIsNone(read_pid(self.path))

    def test_garbage(self):
        self.write("not a pid\n")
        self.assertIsNone(read_pid(self.path))

    def test_emptyFile(self):
        self.write("")
        self.assertIsNone(read_pid(self.path))

    def test_zero(self):
        self.write("0\n")
        self.assertIsNone(read_pid(self.path))

    def test_negative(self):
        self.write("-1\n")
        self.assertIsNone(read_pid(self.path))

    def test_withoutNewline(self):
        self.write("123")
        self.assertEqual(read_pid(self.path), 123)

    def test_directory(self):
        self.assertIsNone(read_pid(self.directory))


class RemovePidfileIfOwnTests(PidfileTestCase):
    def test_removesOwnPid(self):
        write_pidfile(self.path, 4242)
        self.assertTrue(remove_pidfile_if_own(self.path, 4242))
        self.assertFalse(os.path.exists(self.path))

    def test_defaultsToThisProcess(self):
        write_pidfile(self.path, os.getpid())
        self.assertTrue(remove_pidfile_if_own(self.path))
        self.assertFalse(os.path.exists(self.path))

    def test_keepsOtherPid(self):
        write_pidfile(self.path, 4243)
        self.assertFalse(remove_pidfile_if_own(self.path, 4242))
        self.assertEqual(read_pid(self.path), 4243)

    def test_keepsGarbage(self):
        self.write("garbage")
        self.assertFalse(remove_pidfile_if_own(self.path, 4242))
        self.assertTrue(os.path.exists(self.path))

    def test_missingFile(self):
        self.assertFalse(remove_pidfile_if_own(self.path, 4242))

    def test_noPath(self):
        self.assertFalse(remove_pidfile_if_own(None, 4242))
        self.assertFalse(remove_pidfile_if_own("", 4242))


class ProtectTwistdPidfileTests(PidfileTestCase):
    """
    L{protect_twistd_pidfile} makes twistd's C{removePID} leave a pidfile
    that names another process.
    """

    def setUp(self):
        PidfileTestCase.setUp(self)
        # Undo the process-wide patch after each test.
        self.original = _twistd_unix.UnixApplicationRunner.removePID
        self.patch(_twistd_unix.UnixApplicationRunner, "removePID", self.original)
        self.patch(_twisted, "_pidfile_patched", False)
        protect_twistd_pidfile()

    def removePID(self, path):
        # removePID does not use self.
        _twistd_unix.UnixApplicationRunner.removePID(None, path)

    def test_patchesRemovePID(self):
        self.assertIsNot(_twistd_unix.UnixApplicationRunner.removePID, self.original)

    def test_leavesPidfileNamingAnotherLiveProcess(self):
        write_pidfile(self.path, os.getppid())
        self.removePID(self.path)
        self.assertEqual(read_pid(self.path), os.getppid())

    def test_removesPidfileNamingThisProcess(self):
        write_pidfile(self.path, os.getpid())
        self.removePID(self.path)
        self.assertFalse(os.path.exists(self.path))

    def test_removesUnreadablePidfile(self):
        self.write("garbage")
        self.removePID(self.path)
        self.assertFalse(os.path.exists(self.path))

    def test_noPidfileIsANoOp(self):
        self.removePID("")
        self.removePID(None)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_missingPidfileLoggedLikeTwistd(self):
        self.removePID(self.path)
        self.assertEqual(len(self.flushLoggedErrors(FileNotFoundError)), 1)

    def test_idempotent(self):
        patched = _twistd_unix.UnixApplicationRunner.removePID
        protect_twistd_pidfile()
        self.assertIs(_twistd_unix.UnixApplicationRunner.removePID, patched)
        write_pidfile(self.path, os.getpid())
        self.removePID(self.path)
        self.assertFalse(os.path.exists(self.path))


def _rmtree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)
