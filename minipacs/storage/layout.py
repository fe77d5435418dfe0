"""Where an instance lives on disk, relative to the store root.

Paths are ``h[:2]/h[2:4]/<study>/<series>/<sop>.dcm`` with ``h = sha1(study UID)``. Real UIDs
share long organisational prefixes, so the hash (not the UID) picks the two fan-out levels,
spreading studies evenly over 65536 folders and keeping every directory small. Keeping the
study and series folders makes a study easy to find, copy or delete by hand. Every component
is a validated UID (PS3.5 9.1: digits and dots only), so a path can never escape the root.
"""

import hashlib

from minipacs.storage.uids import validate_uid


def instance_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Return the relative POSIX path of an instance, built only from validated UIDs."""
    study = validate_uid(study_uid)
    series = validate_uid(series_uid)
    sop = validate_uid(sop_uid)
    # sha1 for distribution, not security: the inputs are already validated.
    h = hashlib.sha1(study.encode("ascii"), usedforsecurity=False).hexdigest()
    return f"{h[:2]}/{h[2:4]}/{study}/{series}/{sop}.dcm"
