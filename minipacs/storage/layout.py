"""Where an instance lives on disk, relative to the store root.

Layout: ``h[:2]/h[2:4]/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` with
``h = sha1(StudyInstanceUID)`` in hex.

- Real UIDs share long organisational prefixes, so the hash (not the UID) picks the two
  fan-out levels: studies spread evenly over 65536 folders and no directory grows large.
- The study and series folders make a study easy to find, copy or delete by hand.
- Every component is a validated UID (PS3.5 9.1: digits and dots only, at most 64
  characters), so a path never escapes the root, never starts with a dot (the store's
  own ``.tmp`` and ``.spool`` folders cannot be hit) and stays under 210 characters.
- The path depends on the study and series as well as the SOP Instance UID, so an
  instance re-sent under another study (duplicate policy "replace") gets a new path:
  the new file is written and indexed first, and the old file is removed only after the
  index commit that points away from it (the index outcome carries the old path).
"""

import functools
import hashlib

from minipacs.storage.uids import validate_uid

SUFFIX = ".dcm"


def instance_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Return the relative POSIX path of an instance, built only from validated UIDs."""
    series = validate_uid(series_uid)
    sop = validate_uid(sop_uid)
    return f"{_study_folder(study_uid)}/{series}/{sop}{SUFFIX}"


@functools.lru_cache(maxsize=256)
def _study_folder(study_uid: str) -> str:
    """A study's folder: its two fan-out levels, then the validated UID (one hash a study)."""
    study = validate_uid(study_uid)
    # sha1 for distribution, not security: the input is already validated.
    h = hashlib.sha1(study.encode("ascii"), usedforsecurity=False).hexdigest()
    return f"{h[:2]}/{h[2:4]}/{study}"


def sop_uid_of(rel_path: str) -> str:
    """The SOP Instance UID an instance path was built from."""
    return rel_path.rsplit("/", 1)[-1].removesuffix(SUFFIX)
