"""Crash recovery: files renamed into the store by a writer that died before its index commit.

Such a file is complete and durable (it was fsynced before the rename) but no C-STORE was
acknowledged for it. It is indexed under "keep-first" (a retry of the same store by the
sender then finds it stored); if the index already holds that SOP Instance UID at another
path (a "replace" that never committed), the file is removed instead. Run at start, before
accepting associations, on each node: a node recovers the journals of its own host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine, select

from minipacs.index.db import write_session
from minipacs.index.ingest import apply_records
from minipacs.index.models import Instance
from minipacs.index.reindex import read_record
from minipacs.storage.filestore import FileStore
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


def _indexed_paths(engine: Engine, rel_paths: list[str]) -> set[str]:
    """The paths among rel_paths that the index points at (looked up by SOP Instance UID)."""
    uids = {sop_uid_of(rel) for rel in rel_paths}
    with engine.connect() as connection:
        return set(connection.scalars(select(Instance.rel_path).where(Instance.sop_uid.in_(uids))))


def recover(store: FileStore, engine: Engine) -> RecoveryReport:
    """Index or remove the files dead writers left without an index row; drop their journals."""
    report = RecoveryReport()
    for journal in store.dead_journals():
        report.checked += len(journal.rel_paths)
        known: set[str] = set()
        for start in range(0, len(journal.rel_paths), 500):
            known |= _indexed_paths(engine, journal.rel_paths[start : start + 500])
        for rel_path in journal.rel_paths:
            if rel_path in known:
                continue
            try:
                stat = store.path(rel_path).stat()
            except (FileNotFoundError, ValueError):
                continue  # never renamed into place, or removed after a failed commit
            if stat.st_mtime > journal.mtime + _MTIME_MARGIN:
                continue
            try:
                record = read_record(store, rel_path, stat)
            except Exception as exc:  # a damaged file is reported and left for inspection
                report.failed.append((rel_path, str(exc)))
                continue
            with write_session(engine) as session, session.begin():
                (outcome,) = apply_records(session, [record], "keep-first")
            if outcome.stored:
                report.indexed.append(rel_path)
            elif outcome.existing_path != rel_path:
                store.remove(rel_path)
                report.removed.append(rel_path)
        journal.path.unlink(missing_ok=True)
    return report
