"""Atomic, durable instance files: write to a temp file, fsync, rename, fsync the directories."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

_CHUNK = 1 << 20  # 1 MiB copy chunks keep memory flat for large data sets
_TMP = ".tmp"
_NOT_INSTANCES = frozenset({_TMP, ".spool"})


class OutOfSpace(Exception):
    """Free space on the store's filesystem is below the configured floor."""


@dataclass(frozen=True)
class StoredFile:
    """An instance file that is durably on disk."""

    rel_path: str
    size: int


def _fsync_dir(path: Path) -> None:
    """Flush a directory so the entries created or renamed in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_rel(rel_path: str) -> str:
    """Return rel_path if it stays inside the root, else raise ValueError."""
    parts = PurePosixPath(rel_path).parts
    if not parts or rel_path.startswith("/") or ".." in parts:
        raise ValueError(f"{rel_path!r} is not a safe relative path inside the store")
    return rel_path


class FileStore:
    """Instance files under one root directory, written atomically and durably."""

    def __init__(self, root: Path, min_free_bytes: int = 0, fsync: bool = True) -> None:
        """Open the store at root, creating root and its temp directory if needed."""
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.fsync = fsync
        # The temp directory lives under root so os.replace never crosses filesystems.
        self._tmp = self.root / _TMP
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, rel_path: str) -> Path:
        """Return the absolute path of a stored file."""
        return self.root / _check_rel(rel_path)

    def exists(self, rel_path: str) -> bool:
        """Return whether a file is stored at rel_path."""
        return self.path(rel_path).is_file()

    def remove(self, rel_path: str) -> None:
        """Delete the file at rel_path; a missing file is not an error."""
        self.path(rel_path).unlink(missing_ok=True)

    def ensure_free_space(self) -> None:
        """Raise OutOfSpace if the filesystem's free space is below min_free_bytes."""
        free = shutil.disk_usage(self.root).free
        floor = self.min_free_bytes
        if free < floor:
            raise OutOfSpace(f"free space {free} bytes is below the floor of {floor} bytes")

    def cleanup_temp(self) -> int:
        """Delete everything left in the temp directory by a crash; return how many entries."""
        count = 0
        for entry in self._tmp.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
            count += 1
        return count

    def iter_files(self) -> Iterator[str]:
        """Yield the relative POSIX path of every stored .dcm file."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            # Temp and spool files are not committed instances.
            dirnames[:] = [d for d in dirnames if d not in _NOT_INSTANCES]
            rel_dir = PurePosixPath(Path(dirpath).relative_to(self.root).as_posix())
            for name in filenames:
                if name.endswith(".dcm"):
                    yield str(rel_dir / name)

    def write_instance(self, rel_path: str, header: bytes, dataset: bytes | Path) -> StoredFile:
        """Write header + data set to rel_path atomically; the file is durable on return."""
        dest = self.path(rel_path)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                if isinstance(dataset, Path):
                    with dataset.open("rb") as src:
                        shutil.copyfileobj(src, f, _CHUNK)
                else:
                    f.write(dataset)
                f.flush()
                size = f.tell()
                if self.fsync:
                    os.fsync(f.fileno())
            created = self._make_parents(dest.parent)
            # rename(2) is atomic: readers see either no file or the complete one.
            os.replace(tmp_name, dest)
            if self.fsync:
                # The new entry lives in dest.parent; each created directory's entry in its parent.
                for directory in {dest.parent, *(d.parent for d in created)}:
                    _fsync_dir(directory)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        return StoredFile(rel_path=rel_path, size=size)

    def _make_parents(self, directory: Path) -> list[Path]:
        """Create directory and its missing ancestors; return the ones created, top down."""
        missing: list[Path] = []
        while not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        missing.reverse()
        for d in missing:
            # exist_ok: a concurrent writer may create the same study folder first.
            d.mkdir(exist_ok=True)
        return missing
