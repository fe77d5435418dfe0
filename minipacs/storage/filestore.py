"""Atomic, durable instance files, written to a temp file and then put in place.

write_instance flushes before the rename: a crash at any point leaves the old file, the
new file, or an orphan temp file under ``<root>/.tmp/``; never a partial file at an
instance's path. stage_instance + sync_staged link first and flush after, for a path no
file is at yet: the flush then carries data and entry at once and can overlap the index
commit; only a power loss before the flush can leave such a file short, and the index
lists it as unsynced until the flush is done (models.UnsyncedFile). The flush is a group
syncfs (storage.groupflush) or an fsync of the file and its folders. Several nodes may
share one store (on a network filesystem), so temp files are named after the host,
process and process run that own them, and ``cleanup_temp`` only removes ones no live
writer owns.

A file put in place whose index row was never committed (the process died in
between) would be an orphan. So every writer notes the paths it is about to put in place
in a journal of its own, ``<root>/.journals/<host>~<pid>~<run>~<store>-<n>.journal``; they
rotate every minute and only the last two are kept, since an index commit takes far
less. After a crash, ``dead_journals`` hands the paths of dead writers to the index's recovery
(minipacs.index.recover), which indexes or removes each orphan. The journal is not
fsynced: it survives a process crash; after a power loss an orphan can remain, which
reindex picks up.
"""

import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from minipacs.lockfile import LockFile
from minipacs.storage import groupflush, writeback
from minipacs.storage.groupflush import GroupFlush
from minipacs.storage.layout import SUFFIX

log = logging.getLogger("minipacs.store")

_TMP = ".tmp"
_JOURNALS = ".journals"
# Worker mode: claims are also flocks on one of this many lock files (see claim).
_LOCKS = ".locks"
_CLAIM_SLOTS = 64
_PART = ".part"
# Numbers the temp files of this process (of all its stores).
_TEMP_COUNT = itertools.count()
_JOURNAL = ".journal"
JOURNAL_ROTATE_SECONDS = 60.0
# Files nobody has written to for this long are orphans whoever made them: a temp file is
# written in one go, a spool file at least every idle timeout (300 s by default).
STALE_SECONDS = 3600.0


# A process's own run: a restarted container reuses its PID (often 1) but not this.
def _boot_id() -> str:
    """This boot of the host (Linux), so that a PID from before a reboot is never alive."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return "nobootid"


_BOOT = _boot_id()
# A process's own run: a restarted container reuses its PID (often 1) but not this. Its
# first 8 characters name the boot it began in.
_RUN_TOKEN = _BOOT + secrets.token_hex(4)
HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
# This process as a writer of the store and the index: <host>~<pid>~<run>.
WRITER_ID = f"{HOST}~{os.getpid()}~{_RUN_TOKEN}"
# link(2) errors of filesystems without hard links (some network and FUSE filesystems).
_LINK_UNSUPPORTED = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV})
_SENDFILE_FALLBACK = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV})
# Directories whose own entry is known durable; bounded so it cannot grow with the archive.
_DURABLE_DIRS_MAX = 100_000
# stat(2) errors that mean no file is at a path (those Path.is_file answers False to).
_NOTHING_THERE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})
# Buffers one writev(2) takes at most (Linux IOV_MAX).
_IOV_MAX = 1024
# A passing free-space check stands this long (seconds): a statvfs per store costs GIL
# hand-offs under load, and at most this long's writes can pass the floor unnoticed.
FREE_SPACE_RECHECK = 0.25

DatasetSource = bytes | memoryview | Path | list[bytes]


class OutOfSpace(Exception):
    """Free space on the store's filesystem is below the configured floor."""


@dataclass(frozen=True)
class DeadJournal:
    """The paths a dead writer was renaming into place, and when it last noted one."""

    path: Path
    mtime: float
    rel_paths: list[str]


@dataclass(frozen=True)
class StoredFile:
    """An instance file that is durably on disk."""

    rel_path: str
    size: int
    # A file was already at the path and this one replaced it.
    replaced: bool = False


@dataclass(frozen=True)
class StagedFile:
    """An instance file complete at its path, not yet flushed to disk (see sync_staged)."""

    rel_path: str
    size: int
    fd: int
    # The group flush generation before the data was written (GroupFlush.mark).
    mark: int | None = None


def _fsync_dir(path: str | Path) -> None:
    """Flush a directory so the entries created or renamed in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Components separated by "/": none empty or dot-led (no absolute path, no "..", not our
# .tmp or .spool), none with a backslash or a NUL. One C-level match a call.
_SAFE_REL = re.compile(r"[^./\\\0][^/\\\0]*(?:/[^./\\\0][^/\\\0]*)*")


def _check_rel(rel_path: str) -> str:
    """Return rel_path if it names a file inside the root, outside the store's own folders."""
    if _SAFE_REL.fullmatch(rel_path) is None:
        raise ValueError(f"{rel_path!r} is not a safe relative path inside the store")
    return rel_path


def writer_is_dead(writer: str) -> bool:
    """Whether a writer id (<host>~<pid>~<run>) names a process of this host that is gone.

    Another host's writers are never dead to us: each node recovers its own.
    """
    fields = writer.split("~")
    if len(fields) != 3 or not fields[1].isdigit():
        return False
    host, pid, run = fields
    if host != HOST or run == _RUN_TOKEN:
        return False
    if run[:8] != _BOOT:
        # From before the last reboot (the power loss recovery is for): its PID may now
        # belong to anyone.
        return True
    return int(pid) == os.getpid() or not _pid_alive(int(pid))


def _pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _discard_temp(tmp: str | Path, fd: int) -> None:
    """Close and remove a temp file that will not be put in place."""
    os.close(fd)
    with suppress(FileNotFoundError):
        os.unlink(tmp)


def _move(tmp: str | Path, dest: str | Path, link: bool) -> None:
    """Put tmp at dest: link(2) fails if something is there, rename(2) replaces it."""
    if link:
        os.link(tmp, dest)
    else:
        os.replace(tmp, dest)


def _write_all(fd: int, buffers: list[bytes | memoryview]) -> int:
    """Write the buffers to fd in order, in as few writev(2) calls as it takes; return bytes."""
    views = [memoryview(b) for b in buffers if len(b)]
    total = 0
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        total += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]
    return total


def _copy_file(source: Path, out_fd: int) -> None:
    """Append a whole file to out_fd, in the kernel when it can (sendfile)."""
    with source.open("rb") as src:
        offset = 0
        remaining = os.fstat(src.fileno()).st_size
        try:
            while remaining > 0:
                sent = os.sendfile(out_fd, src.fileno(), offset, min(remaining, 1 << 30))
                if sent == 0:
                    raise OSError(errno.EIO, f"{source} shrank while being copied")
                offset += sent
                remaining -= sent
        except OSError as exc:
            if exc.errno not in _SENDFILE_FALLBACK:
                raise
            src.seek(offset)
            os.lseek(out_fd, 0, os.SEEK_END)
            with open(out_fd, "wb", closefd=False) as out:
                shutil.copyfileobj(src, out, 1 << 20)


class FileStore:
    """Instance files under one root directory, written atomically and durably."""

    def __init__(
        self,
        root: Path,
        spool_dir: Path,
        min_free_bytes: int,
        fsync: bool = True,
        flush: str = "file",
        shared_claims: bool = False,
    ) -> None:
        """Open the store at root, creating root, its temp folder and the spool if needed.

        flush "filesystem" makes staged files durable by group syncfs (storage.groupflush)
        where the system has it; "file" fsyncs each file and its folders.
        shared_claims (worker mode): claim() holds a path against the other processes
        of this host too.
        """
        self.root = Path(root).absolute()
        self.spool_dir = Path(spool_dir).absolute()
        self.min_free_bytes = min_free_bytes
        self.fsync = fsync
        # The temp folder lives under root so os.replace never crosses filesystems.
        self._tmp = self.root / _TMP
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._journals = self.root / _JOURNALS
        self._journals.mkdir(exist_ok=True)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        # Folders as strings: pathlib's joins and hashes cost more than the syscalls here.
        self._root_str = str(self.root)
        self._root_prefix = os.path.join(self._root_str, "")
        self._tmp_prefix = f"{self._tmp}/{WRITER_ID}~"
        self._durable_dirs: set[str] = set()
        # Paths being stored by a thread of this process, and who waits for them.
        self._claims: set[str] = set()
        self._claims_cond = threading.Condition()
        self._claim_locks: list[LockFile] = []
        if shared_claims:
            locks = self.root / _LOCKS
            locks.mkdir(exist_ok=True)
            self._claim_locks = [LockFile(locks / f"{i:02x}") for i in range(_CLAIM_SLOTS)]
        # False once link(2) failed for want of hard links on this filesystem.
        self._links = True
        # Monotonic time until which the last passing free-space check stands.
        self._free_until = 0.0
        self._journal_lock = threading.Lock()
        self._journal_fd: int | None = None
        self._journal_seq = 0
        self._journal_since = 0.0
        # Two stores in one process (tests, tools) must not share a journal.
        self._journal_id = secrets.token_hex(3)
        if fsync:
            _fsync_dir(self.root.parent)
            _fsync_dir(self.root)
        self._group: GroupFlush | None = None
        if fsync and flush == "filesystem":
            reason = groupflush.unsupported(self.root)
            if reason is None:
                self._group = GroupFlush(self.root)
            else:
                log.warning("storage.flush = filesystem not used (%s): flushing each file", reason)

    def path(self, rel_path: str) -> Path:
        """Return the absolute path of a stored file."""
        return self.root / _check_rel(rel_path)

    def _abs(self, rel_path: str) -> str:
        """path() as a string, for the store's hot path."""
        return self._root_prefix + _check_rel(rel_path)

    def exists(self, rel_path: str) -> bool:
        """Return whether a file is stored at rel_path (raise if that cannot be told)."""
        try:
            return stat.S_ISREG(os.stat(self._abs(rel_path)).st_mode)
        except OSError as exc:
            # As Path.is_file: only "nothing there" is an answer. An I/O error (ESTALE on
            # a shared store) taken for "no file" would make an acknowledged one look new.
            if exc.errno in _NOTHING_THERE:
                return False
            raise

    def open_instance(self, rel_path: str) -> BinaryIO:
        """Open a stored file for reading (preamble, File Meta, data set)."""
        return self.path(rel_path).open("rb")

    def remove(self, rel_path: str) -> None:
        """Delete the file at rel_path; a missing file is not an error."""
        path = self.path(rel_path)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        if self.fsync:
            # Otherwise a replaced file could reappear after a crash and be reindexed.
            _fsync_dir(path.parent)

    def ensure_free_space(self) -> None:
        """Raise OutOfSpace if the store's or the spool's free space is below the floor.

        A passing check stands for FREE_SPACE_RECHECK seconds; a failing one is never kept.
        """
        now = time.monotonic()
        if now < self._free_until:
            return
        checked: set[int] = set()
        for folder in (self.root, self.spool_dir):
            device = os.stat(folder).st_dev
            if device in checked:
                continue
            checked.add(device)
            free = shutil.disk_usage(folder).free
            if free < self.min_free_bytes:
                raise OutOfSpace(
                    f"{free} bytes free under {folder}, below the floor of "
                    f"{self.min_free_bytes} bytes"
                )
        self._free_until = now + FREE_SPACE_RECHECK

    def cleanup_temp(self, stale_seconds: float = STALE_SECONDS) -> int:
        """Delete temp and spool files left by dead writers; return how many were removed.

        Journals of dead writers are left for recovery, unless untouched for stale_seconds.
        """
        removed = 0
        cutoff = time.time() - stale_seconds
        for entry in self._tmp.iterdir():
            if self._orphan_temp(entry, cutoff):
                removed += _delete(entry)
        for entry in self._journals.iterdir():
            # Left for recovery (dead_journals), unless nobody recovered it for long.
            if _mtime(entry) < cutoff:
                removed += _delete(entry)
        for entry in self.spool_dir.iterdir():
            # Spool files carry no owner, and other nodes may share the folder: age decides.
            if entry.is_file() and entry.suffix == ".spool" and _mtime(entry) < cutoff:
                removed += _delete(entry)
        return removed

    def _orphan_temp(self, entry: Path, cutoff: float) -> bool:
        """Whether a temp folder entry belongs to no writer that is still running."""
        fields = entry.name.removesuffix(_PART).split("~")
        if len(fields) == 4:
            writer = "~".join(fields[:3])
            if writer == WRITER_ID:
                return False
            # Same host: a dead PID is a crash leftover, and so is our own PID from an
            # earlier run (containers restart with the same PID).
            if writer_is_dead(writer):
                return True
        return _mtime(entry) < cutoff

    def iter_files(self) -> Iterator[str]:
        """Yield the relative POSIX path of every stored instance file."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            # Temp and spool files are not committed instances; nor is anything hidden.
            dirnames[:] = [
                d for d in dirnames if not d.startswith(".") and Path(dirpath, d) != self.spool_dir
            ]
            rel_dir = PurePosixPath(Path(dirpath).relative_to(self.root).as_posix())
            for name in filenames:
                if name.endswith(SUFFIX) and not name.startswith("."):
                    yield str(rel_dir / name)

    @contextlib.contextmanager
    def claim(self, rel_path: str) -> Iterator[None]:
        """Hold rel_path for one store at a time in this process (waits for another's).

        Two stores of one instance at once (a sender retrying on a new association while
        its first try is still flushing) would otherwise see each other's unflushed file
        as stored, or put one file over the other under the other's index row. With
        shared_claims the other worker processes wait too, where such a retry usually
        lands, and so does recovery after a worker died.
        """
        with self._claims_cond:
            while rel_path in self._claims:
                self._claims_cond.wait()
            self._claims.add(rel_path)
        try:
            if self._claim_locks:
                slot = zlib.crc32(rel_path.encode()) % _CLAIM_SLOTS
                with self._claim_locks[slot].held():
                    yield
            else:
                yield
        finally:
            with self._claims_cond:
                self._claims.remove(rel_path)
                self._claims_cond.notify_all()

    def make_durable(self, rel_path: str) -> None:
        """Flush a file already in place (perhaps another node's, still unflushed)."""
        if not self.fsync:
            return
        path = self._abs(rel_path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._sync_entries(os.path.dirname(path))

    def write_instance(
        self, rel_path: str, preamble_and_meta: bytes, dataset_source: DatasetSource
    ) -> StoredFile:
        """Write preamble/meta + data set to rel_path atomically; durable on return."""
        tmp, fd, size = self._write_temp(preamble_and_meta, dataset_source)
        try:
            self._note_pending(rel_path)
        except BaseException:
            _discard_temp(tmp, fd)
            raise
        return self._commit_temp(tmp, fd, rel_path, size)

    def _commit_temp(self, tmp: str, fd: int, rel_path: str, size: int) -> StoredFile:
        """Flush a temp file, rename it to rel_path, flush its folders: durable on return."""
        dest = self._abs(rel_path)
        try:
            try:
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._rename_into_place(tmp, dest)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if self.fsync:
            self._sync_entries(os.path.dirname(dest))
        return StoredFile(rel_path=rel_path, size=size)

    def stage_instance(
        self,
        rel_path: str,
        preamble_and_meta: bytes,
        dataset_source: DatasetSource,
        early_writeback: bool = False,
    ) -> StagedFile | StoredFile:
        """Write an instance to a path nothing is at yet, complete but not yet flushed.

        Putting it in place before the flush lets one flush carry the data and the new
        entry, and sync_staged can run while the index commits. Readers see the whole file
        (the link is atomic); only a power loss before sync_staged returns can leave it
        short, which is why its index row is listed as unsynced until then. A file found
        at the path (perhaps acknowledged, and it must survive a power loss) is replaced
        only the write_instance way, flushed first: that returns a StoredFile.
        early_writeback starts writing the data at once (storage.writeback), for a flush
        that waits for other work first and has no other store's files to carry.
        """
        if not self._links:
            return self.write_instance(rel_path, preamble_and_meta, dataset_source)
        dest = self._abs(rel_path)
        mark = self.flush_mark()
        tmp, fd, size = self._write_temp(preamble_and_meta, dataset_source)
        try:
            if early_writeback and self.fsync:
                writeback.start(fd)
            self._note_pending(rel_path)
            # link(2) refuses to replace what is there, unlike rename(2).
            self._rename_into_place(tmp, dest, link=True)
            os.unlink(tmp)
        except OSError as exc:
            return self._replace_staged(tmp, fd, rel_path, size, exc)
        except BaseException:
            _discard_temp(tmp, fd)
            raise
        return StagedFile(rel_path=rel_path, size=size, fd=fd, mark=mark)

    def _replace_staged(
        self, tmp: str, fd: int, rel_path: str, size: int, cause: OSError
    ) -> StoredFile:
        """stage_instance found a file at the path, or no hard links: flush, then rename."""
        if not isinstance(cause, FileExistsError):
            if cause.errno not in _LINK_UNSUPPORTED:
                _discard_temp(tmp, fd)
                raise cause
            # Not worth a failing link(2) per store from now on.
            log.warning(
                "no hard links on %s (%s): files are flushed before rename", self.root, cause
            )
            self._links = False
        stored = self._commit_temp(tmp, fd, rel_path, size)
        return dataclasses.replace(stored, replaced=isinstance(cause, FileExistsError))

    def flushes(self, path: Path) -> bool:
        """Whether flush_all also makes a file written at `path` durable (same filesystem)."""
        if self._group is None:
            return False
        try:
            return os.stat(path).st_dev == os.stat(self.root).st_dev
        except OSError:
            return False

    def flush_mark(self) -> int | None:
        """The group flush's generation now, for flush_all(since=); None without one."""
        return None if self._group is None else self._group.mark()

    def flush_all(self, since: int | None = None) -> None:
        """One group flush: what was written to the store's filesystem before is durable.

        With `since` (a flush_mark()), raise also if a flush running since then failed.
        """
        if self._group is None:
            raise OSError("no group flush (storage.flush = filesystem) to flush with")
        self._group.flush(since=since)

    def sync_staged(self, staged: StagedFile) -> StoredFile:
        """Flush a staged file and its folders to disk; the file is durable on return."""
        group = self._group
        if group is not None:
            os.close(staged.fd)
            # The data and every entry up to the root are dirty state of this filesystem.
            group.flush(since=staged.mark)
            self._mark_durable(os.path.dirname(self._abs(staged.rel_path)))
            return StoredFile(rel_path=staged.rel_path, size=staged.size)
        try:
            if self.fsync:
                os.fsync(staged.fd)
        finally:
            os.close(staged.fd)
        if self.fsync:
            self._sync_entries(os.path.dirname(self._abs(staged.rel_path)))
        return StoredFile(rel_path=staged.rel_path, size=staged.size)

    def _write_temp(
        self, preamble_and_meta: bytes, dataset_source: DatasetSource
    ) -> tuple[str, int, int]:
        """Write a new temp file; return its path, its open descriptor and its size."""
        # WRITER_ID is this process's own: a count makes the name unique, no random needed.
        tmp = f"{self._tmp_prefix}{next(_TEMP_COUNT):x}{_PART}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            if isinstance(dataset_source, Path):
                _write_all(fd, [preamble_and_meta])
                _copy_file(dataset_source, fd)
                size = os.fstat(fd).st_size
            else:
                chunks = dataset_source if isinstance(dataset_source, list) else [dataset_source]
                size = _write_all(fd, [preamble_and_meta, *chunks])
        except BaseException:
            _discard_temp(tmp, fd)
            raise
        return tmp, fd, size

    def _rename_into_place(self, tmp: str, dest: str, link: bool = False) -> None:
        """rename(2) (or link(2)) tmp to dest, creating dest's folder unless known to exist."""
        # Every syscall lets the GIL go, and under load getting it back costs more than the
        # call: a folder already made durable is not created (mkdir + stat) again.
        parent = os.path.dirname(dest)
        if parent not in self._durable_dirs:
            os.makedirs(parent, exist_ok=True)
        try:
            # rename(2) is atomic: readers see the old file or the complete new one.
            _move(tmp, dest, link)
        except FileNotFoundError:
            if not os.path.exists(tmp):
                raise
            # The folder was removed behind our back: it and those above are new again.
            folder = parent
            while len(folder) > len(self._root_str):
                self._durable_dirs.discard(folder)
                folder = os.path.dirname(folder)
            os.makedirs(parent, exist_ok=True)
            _move(tmp, dest, link)

    def _note_pending(self, rel_path: str) -> None:
        """Journal a path about to be renamed into place (see the module docstring)."""
        line = (rel_path + "\n").encode("ascii")
        with self._journal_lock:
            now = time.monotonic()
            if self._journal_fd is None or now - self._journal_since > JOURNAL_ROTATE_SECONDS:
                self._rotate_journal(now)
            assert self._journal_fd is not None
            os.write(self._journal_fd, line)

    def _journal_path(self, seq: int) -> Path:
        name = f"{WRITER_ID}~{self._journal_id}-{seq}{_JOURNAL}"
        return self._journals / name

    def _rotate_journal(self, now: float) -> None:
        """Start a new journal; the one before it stays, older ones are settled."""
        if self._journal_fd is not None:
            os.close(self._journal_fd)
        self._journal_seq += 1
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self._journal_fd = os.open(self._journal_path(self._journal_seq), flags, 0o666)
        self._journal_since = now
        if self._journal_seq > 2:
            self._journal_path(self._journal_seq - 2).unlink(missing_ok=True)

    def close(self) -> None:
        """Release the journal at a clean stop: everything written has been settled."""
        if self._group is not None:
            self._group.close()
            self._group = None
        with self._journal_lock:
            if self._journal_fd is not None:
                os.close(self._journal_fd)
                self._journal_fd = None
            for seq in (self._journal_seq - 1, self._journal_seq):
                if seq > 0:
                    self._journal_path(seq).unlink(missing_ok=True)
        for lock in self._claim_locks:
            lock.close()
        self._claim_locks = []

    def dead_journals(self) -> list[DeadJournal]:
        """Journals of writers that are no longer running, for the index to recover."""
        found = []
        for entry in self._journals.glob(f"*{_JOURNAL}"):
            fields = entry.name.removesuffix(_JOURNAL).split("~")
            if len(fields) != 4 or not writer_is_dead("~".join(fields[:3])):
                continue  # not a journal, another node's (it recovers its own), or alive
            try:
                text = entry.read_text("ascii", errors="replace")
                mtime = entry.stat().st_mtime
            except FileNotFoundError:
                continue
            paths = list(dict.fromkeys(line for line in text.splitlines() if line))
            found.append(DeadJournal(entry, mtime, paths))
        return found

    def _mark_durable(self, directory: str, fsync_parents: bool = False) -> None:
        """Note a folder and those above it as durable: no mkdir for them again.

        After a group flush they are; otherwise (fsync_parents) each entry not yet known
        durable is flushed in its parent first.
        """
        if len(self._durable_dirs) > _DURABLE_DIRS_MAX:
            self._durable_dirs.clear()
        while len(directory) > len(self._root_str) and directory not in self._durable_dirs:
            if fsync_parents:
                _fsync_dir(os.path.dirname(directory))
            self._durable_dirs.add(directory)
            directory = os.path.dirname(directory)

    def _sync_entries(self, directory: str) -> None:
        """Make the renamed file's entry durable, and every not-yet-durable folder above it.

        A folder another thread or node created may not be fsynced yet when we use it, so
        each folder's entry is flushed once by whoever first needs it, not by its creator.
        """
        _fsync_dir(directory)
        self._mark_durable(directory, fsync_parents=True)


def _mtime(path: Path) -> float:
    """Last modification time, or +inf if the entry vanished (someone else cleaned it)."""
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _delete(entry: Path) -> int:
    """Remove a file or folder; return 1 if this call removed it."""
    try:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    except FileNotFoundError:
        return 0
    return 1
