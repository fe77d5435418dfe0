"""Verification SOP Class as SCP: C-ECHO (PS3.4 Annex A, PS3.7 9.1.5)."""

from __future__ import annotations

from minipacs.net.operations import SUCCESS, Operation


def answer_echo(operation: Operation) -> None:
    """Answer a C-ECHO-RQ with Success at once (the session's fast path)."""
    operation.answer(SUCCESS)


async def handle_echo(operation: Operation) -> None:
    """Answer a C-ECHO-RQ with Success."""
    await operation.respond(SUCCESS)
