"""The durable spool: instances are written while they arrive and appear complete or not at all.

A received data set goes into a new file in ``<spool>/.incoming`` fragment
by fragment (no instance is ever held in memory whole).  Once it is checked,
the file is fsynced, renamed to its place in the spool and the directory
entry fsynced: only then may the sender be told *Success*.  A crash leaves
at most files in ``.incoming``, never acknowledged; the node removes them at
start (the senders retry).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

#: Sub-directory of the spool for instances being received.
INCOMING = ".incoming"


def fsync_directory(path: Path) -> None:
    """Make the entries of directory ``path`` (new files, renames, new sub-directories) durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def make_durable_dirs(path: Path, root: Path) -> None:
    """Create ``path`` and its missing parents below ``root``, each entry durable.

    A new directory survives a power loss only once its parent directory is
    fsynced.  The parent is fsynced for every level, existing or not: another
    thread or process may have just created it without having fsynced yet.
    """
    levels = []
    current = path
    while current != root and current != current.parent:
        levels.append(current)
        current = current.parent
    for directory in reversed(levels):
        directory.mkdir(exist_ok=True)
        fsync_directory(directory.parent)


class IncomingFile:
    """A file being received into ``<spool>/.incoming``, then moved durably to its place.

    Parameters
    ----------
    incoming_dir : Path
        The spool's ``.incoming`` directory (same file system as the spool).

    Raises
    ------
    OSError
        When the file cannot be created (disk full, permissions).
    """

    def __init__(self, incoming_dir: Path) -> None:
        # Hidden, unique across threads and intake processes; ".*.tmp" is what the node clears at start.
        self.path = incoming_dir / f".{uuid.uuid4().hex}.tmp"
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        self.size = 0
        self.moved = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``."""
        assert self._fd is not None, "write after commit or discard"
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += len(data)

    @contextlib.contextmanager
    def contents(self, offset: int = 0) -> Iterator[memoryview]:
        """A read-only view of what was written from ``offset`` on (memory-mapped: no copy).

        Use the view only inside the ``with`` block.

        Raises
        ------
        OSError
            When the file cannot be mapped (no address space, a file system without mmap).
        """
        assert self._fd is not None, "read after commit or discard"
        if self.size <= offset:
            yield memoryview(b"")
            return
        mapped = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        view = memoryview(mapped)[offset:]
        try:
            yield view
        finally:
            # A view still held (by a traceback) keeps the map: it is unmapped when collected.
            with contextlib.suppress(BufferError):
                view.release()
                mapped.close()

    def commit(self, final: Path) -> None:
        """Make the file durable and move it to ``final`` (see :meth:`sync` and :meth:`move`)."""
        self.sync()
        self.move(final)

    def sync(self) -> None:
        """fsync and close the file (once; later calls do nothing)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def move(self, final: Path) -> None:
        """Rename the synced file to ``final`` and fsync that directory (the new entry is durable only then).

        Raises
        ------
        OSError
            From the file system, e.g. ``FileNotFoundError`` when ``final``'s
            directory is gone; the incoming file is then still there, to move
            again or to :meth:`discard`.
        """
        assert self._fd is None, "move before sync"
        os.replace(self.path, final)
        self.moved = True
        fsync_directory(final.parent)

    def discard(self) -> None:
        """Close and remove the incoming file, if still there (never raises; a second call does nothing)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if not self.moved:  # after a move there is nothing here to remove
            with contextlib.suppress(OSError):
                self.path.unlink()
