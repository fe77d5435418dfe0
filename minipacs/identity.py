"""Who minipacs says it is on the wire and in files (PS3.7 D.3.3.2, PS3.10 7.1)."""

from typing import Final

# A UUID-derived UID (PS3.5 B.2), fixed once for this implementation.
IMPLEMENTATION_CLASS_UID: Final = "2.25.248842587607712769384647376766609119066"
IMPLEMENTATION_VERSION_NAME: Final = "MINIPACS_010"
