"""C library functions the store calls through ctypes: syncfs(2), sync_file_range(2)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any


def function(name: str, argtypes: list[Any]) -> Callable[..., int] | None:
    """libc's `name`, taking `argtypes` and returning an int (errno kept), or None."""
    try:
        # The process's own symbols, libc's among them: no library search (ldconfig -p).
        found = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):
        return None
    found.argtypes = argtypes
    found.restype = ctypes.c_int
    return found  # type: ignore[no-any-return]
