"""A worker's side of worker mode (server.workers > 1; see ops.supervisor).

The supervisor starts each worker as `minipacs serve` again, with its end of a control
line and of a handoff socket inherited and named in WORKER_ENV. The supervisor accepts
connections and hands each to the least busy worker over the handoff socket
(Server.adopt); the worker's association limits are counted by the supervisor for all
workers (RemoteGate); it tells the supervisor when a connection ends ("closed"),
answers its metrics, readiness and stop requests, and stops, gracefully, when the
supervisor is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from minipacs.net import negotiation as neg
from minipacs.net.access import Refusal
from minipacs.ops.control import Channel, ChannelClosed, Message

# Set by the supervisor only; not a setting (MINIPACS_* variables are).
WORKER_ENV: Final = "_MINIPACS_WORKER"
# While the supervisor does not answer, refuse rather than admit uncounted.
_UNCOUNTED = Refusal("association limit (supervisor unreachable)", neg.REJECT_LOCAL_LIMIT)


@dataclass(frozen=True)
class WorkerPlace:
    """What the supervisor handed this worker: its number and inherited sockets."""

    index: int
    control: socket.socket
    handoff: socket.socket


def worker_place() -> WorkerPlace | None:
    """This process's place among the workers (from WORKER_ENV), or None if it is not one."""
    raw = os.environ.pop(WORKER_ENV, None)
    if raw is None:
        return None
    fields = json.loads(raw)
    return WorkerPlace(
        index=int(fields["index"]),
        control=socket.socket(fileno=int(fields["control"])),
        handoff=socket.socket(fileno=int(fields["handoff"])),
    )


def encode_refusal(refusal: Refusal | None) -> Message:
    """A Gate answer as a control reply."""
    return {"refusal": None if refusal is None else [refusal.why, *refusal.result]}


def _decode_refusal(reply: Message) -> Refusal | None:
    value = reply.get("refusal")
    if value is None:
        return None if "error" not in reply else _UNCOUNTED
    why, *result = value
    return Refusal(str(why), (int(result[0]), int(result[1]), int(result[2])))


class RemoteGate:
    """A Gate whose counts the supervisor keeps for every worker (minipacs.net.access)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        # Each admission has a token: a release is then safe to send twice, or for an
        # admission the supervisor refused, which a cancelled admit cannot know.
        self._tokens = itertools.count(1)
        self._held: dict[str, list[int]] = {}

    async def rate_refusal(self, host: str) -> Refusal | None:
        """Ask the supervisor to take one request off host's rate."""
        try:
            return _decode_refusal(await self.channel.request("rate", host=host))
        except ChannelClosed:
            return _UNCOUNTED

    async def admit(self, calling_ae: str) -> Refusal | None:
        """Ask the supervisor to count one more association of calling_ae."""
        token = next(self._tokens)
        try:
            reply = await self.channel.request("admit", ae=calling_ae, token=token)
        except ChannelClosed:
            return _UNCOUNTED
        except asyncio.CancelledError:
            self.channel.notify("release", token=token)
            raise
        refusal = _decode_refusal(reply)
        if refusal is None:
            self._held.setdefault(calling_ae, []).append(token)
        return refusal

    def release(self, calling_ae: str) -> None:
        """Tell the supervisor one association of calling_ae ended."""
        tokens = self._held.get(calling_ae)
        if not tokens:
            return
        token = tokens.pop()
        if not tokens:
            del self._held[calling_ae]
        self.channel.notify("release", token=token)


def worker_handler(
    exposition: Callable[[], Awaitable[bytes]],
    ready: Callable[[], Awaitable[str | None]],
    requested: asyncio.Event,
    hurried: asyncio.Event,
) -> Callable[[Message], Awaitable[Message | None]]:
    """How a worker answers the supervisor: ping, metrics, readiness, stop."""

    async def handle(message: Message) -> Message | None:
        """The reply to one request from the supervisor (None for a notice)."""
        op = message.get("op")
        if op == "metrics":
            return {"text": (await exposition()).decode()}
        if op == "ping":
            # Answered by the event loop itself: it runs (ops.supervisor's watchdog).
            return {}
        if op == "ready":
            return {"problem": await ready()}
        if op == "stop":
            # Only an explicit hurry cuts the grace: under systemd the SIGTERM that reached
            # the supervisor reached this worker too, and its "stop" is not a second one.
            if message.get("hurry"):
                hurried.set()
            requested.set()
            return None
        return {"error": f"unknown request {op!r}"}

    return handle
