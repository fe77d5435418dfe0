"""Crash recovery of what dead writers left half done, run at start on each node.

Unsynced rows (models.UnsyncedFile) come first: an instance row committed while its file
was still being flushed. No success was sent for it unless the flush finished, so a row
whose file is whole stays and one whose file is missing or short (a power loss before
the flush) is withdrawn, with its file. Whole means the size the row recorded and a
data set whose every element length checks out to the last byte: a filesystem that
keeps data ordered (ext4, XFS) shows an unflushed file shorter, never longer with
garbage. A file that cannot be read for another reason (permissions, I/O) keeps its
listing and its row, and is reported.

Then journals: files put into the store by a writer that died before its index commit.
Such a file is complete (a process crash loses no written data; a short one fails to
read and is reported) but no C-STORE was acknowledged for it. It is indexed under
"keep-first" (a retry of the same store by the sender then finds it stored); if the
index already holds that SOP Instance UID at another path (a "replace" that never
committed), the file is removed instead. Run at start, before accepting associations,
on each node: a node recovers the journals of its own host. In worker mode it also runs
while the other workers serve, after one died: each path is held (FileStore.claim) while
it is settled, as a live worker holds it while storing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from minipacs import dataset as dicom
from minipacs.dataset import read_part10
from minipacs.index.db import write_session, write_turn
from minipacs.index.ingest import apply_records, drop_unsynced, withdraw
from minipacs.index.models import Instance, UnsyncedFile
from minipacs.index.reindex import read_record
from minipacs.storage.filestore import HOST, FileStore, writer_is_dead
from minipacs.storage.layout import sop_uid_of

# A file whose mtime is later than its journal's last entry (plus this margin, seconds) was
# written again by someone else since (another node), so it is theirs to index.
_MTIME_MARGIN = 2.0


@dataclass
class RecoveryReport:
    """What recovery did with the paths dead writers were storing."""

    checked: int = 0
    indexed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    # (relative path, reason) of orphans that could not be read; left on disk.
    failed: list[tuple[str, str]] = field(default_factory=list)
    # Unsynced rows whose file was not whole: row and file removed.
    withdrawn: list[str] = field(default_factory=list)


def _indexed_paths(engine: Engine, rel_paths: list[str]) -> set[str]:
    """The paths among rel_paths that the index points at (looked up by SOP Instance UID)."""
    uids = {sop_uid_of(rel) for rel in rel_paths}
    with engine.connect() as connection:
        return set(connection.scalars(select(Instance.rel_path).where(Instance.sop_uid.in_(uids))))


def _is_whole(store: FileStore, rel_path: str, size: int) -> bool | None:
    """Whether the file has the recorded size and a data set whose every length checks out.

    None when that cannot be told now (an I/O or permission error): nothing is removed.
    """
    path = store.path(rel_path)
    try:
        if path.stat().st_size != size:
            return False
        read_part10(path, ())
    except (FileNotFoundError, dicom.DataSetError):
        return False
    except Exception:  # I/O, permissions, or a parse failure of a file of the right size
        return None
    return True


def _recorded_size(session: Session, row: UnsyncedFile) -> int | None:
    """The size the index records for an unsynced row's instance; None if it has none."""
    return session.scalar(
        select(Instance.size).where(
            Instance.sop_uid == row.sop_uid, Instance.rel_path == row.rel_path
        )
    )


def _whole(store: FileStore, row: UnsyncedFile, size: int | None) -> bool | None:
    """_is_whole for a row's file; True when the index holds no row for it any more."""
    return True if size is None else _is_whole(store, row.rel_path, size)


def _settle_unsynced(
    session: Session, store: FileStore, row: UnsyncedFile, checked: tuple[int | None, bool | None]
) -> bool | None:
    """Keep or withdraw one unsynced row in the session; True if its file must go.

    `checked` is (size, whole) as read before the write turn; the file is read again only
    if the recorded size changed since. None leaves the listing for a later start: its
    file could not be read.
    """
    size = _recorded_size(session, row)
    whole = checked[1] if size == checked[0] else _whole(store, row, size)
    if whole is None:
        return None
    drop_unsynced(session, [row.token])
    if whole:
        return False
    return withdraw(session, row.sop_uid, row.rel_path)


def _recover_unsynced(store: FileStore, engine: Engine, report: RecoveryReport) -> None:
    """Settle the unsynced rows of this host's dead writers (see the module docstring)."""
    with Session(engine) as session:
        ours = select(UnsyncedFile).where(UnsyncedFile.writer.startswith(f"{HOST}~"))
        rows = [r for r in session.scalars(ours) if writer_is_dead(r.writer)]
        session.expunge_all()
    for row in rows:
        report.checked += 1
        # Live workers of this node may be storing the same instance (a sender's retry).
        with store.claim(row.rel_path):
            # The file is read before the write turn: the other workers' commits wait for
            # the turn, and should not wait for a walk of the file too.
            with Session(engine) as session:
                size = _recorded_size(session, row)
            checked = (size, _whole(store, row, size))
            with write_turn(engine), write_session(engine) as session, session.begin():
                remove = _settle_unsynced(session, store, row, checked)
            if remove:
                store.remove(row.rel_path)
        if remove is None:
            report.failed.append((row.rel_path, "unreadable; its unsynced listing is kept"))
        elif remove:
            report.withdrawn.append(row.rel_path)


def _recover_journalled(
    store: FileStore, engine: Engine, rel_path: str, journalled: float, report: RecoveryReport
) -> None:
    """Index a dead writer's journalled file, or remove it (see the module docstring)."""
    try:
        stat = store.path(rel_path).stat()
    except (FileNotFoundError, ValueError):
        return  # never renamed into place, or removed after a failed commit
    if stat.st_mtime > journalled + _MTIME_MARGIN:
        return
    try:
        record = read_record(store, rel_path, stat)
    except Exception as exc:  # a damaged file is reported and left for inspection
        report.failed.append((rel_path, str(exc)))
        return
    with write_turn(engine), write_session(engine) as session, session.begin():
        (outcome,) = apply_records(session, [record], "keep-first")
    if outcome.stored:
        report.indexed.append(rel_path)
    elif outcome.existing_path != rel_path:
        store.remove(rel_path)
        report.removed.append(rel_path)


def recover(store: FileStore, engine: Engine) -> RecoveryReport:
    """Settle dead writers' unsynced rows, then index or remove their files without a row."""
    report = RecoveryReport()
    _recover_unsynced(store, engine, report)
    for journal in store.dead_journals():
        report.checked += len(journal.rel_paths)
        known: set[str] = set()
        for start in range(0, len(journal.rel_paths), 500):
            known |= _indexed_paths(engine, journal.rel_paths[start : start + 500])
        for rel_path in journal.rel_paths:
            if rel_path not in known:
                with store.claim(rel_path):
                    _recover_journalled(store, engine, rel_path, journal.mtime, report)
        journal.path.unlink(missing_ok=True)
    return report
