"""UID validation (PS3.5 9.1): the only gate between peer-supplied UIDs and file paths."""

import re

# PS3.5 9.1: components of digits, separated by dots; no leading zero unless the component is "0".
_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_MAX_LEN = 64  # PS3.5 9.1: "shall not exceed 64 characters"


class InvalidUID(ValueError):
    """A value that is not a UID as defined by PS3.5 9.1."""


def validate_uid(value: str) -> str:
    """Return the UID with its padding stripped, or raise InvalidUID if it breaks PS3.5 9.1."""
    # UI values are NUL-padded to even length (PS3.5 6.2); tolerate a stray space pad too.
    uid = value.rstrip("\0 ")
    if not uid:
        raise InvalidUID(f"{value!r} is not a valid UID: it is empty")
    if len(uid) > _MAX_LEN:
        raise InvalidUID(f"{value!r} is not a valid UID: {len(uid)} characters exceeds {_MAX_LEN}")
    if not set(uid) <= set("0123456789."):
        raise InvalidUID(f"{value!r} is not a valid UID: only digits and dots are allowed")
    if "" in uid.split("."):
        raise InvalidUID(f"{value!r} is not a valid UID: it has an empty component")
    if not _UID_RE.fullmatch(uid):
        raise InvalidUID(f"{value!r} is not a valid UID: a component has a leading zero")
    return uid
