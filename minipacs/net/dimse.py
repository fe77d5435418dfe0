"""P-DATA fragments <-> DIMSE messages (PS3.7 9.1, PS3.8 9.3.5.1), sans-I/O.

`MessageAssembler` turns PDVs into `DimseMessage`s and enforces the rules pynetdicom's
`decode_msg` does not: a message's fragments share one accepted presentation context,
the command comes before its data set, and a data set only follows a command that
announced one. Data sets stay in memory up to a threshold; beyond it the caller is asked
to spill them to a spool file (`needs_spill`), so memory never grows with a data set's
size and the disk write happens where the caller chooses (an executor thread).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from minipacs.net.commands import Command, CommandError, decode_command, has_dataset
from minipacs.net.pdu import PduError, Pdv, pdata_header


class DataSet:
    """A received data set: in-memory chunks, or a spool file once it grew large."""

    def __init__(self) -> None:
        self.size = 0
        self.spool_path: Path | None = None
        # Past the size cap: the rest is counted, not kept, and the request refused.
        self.oversized = False
        # Views into the received PDUs (immutable bytes): kept as they are, not copied,
        # until the data set is joined or spilled.
        self._chunks: list[memoryview | bytes] = []
        self._pending = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes held in memory and not yet spilled."""
        return self._pending

    def append(self, data: memoryview) -> None:
        """Add one fragment (a view into a received PDU, which stays unchanged)."""
        if not data:
            return
        # A view keeps its whole PDU alive: only one that is most of it is kept as it is,
        # so what is held stays within twice what size and the spill threshold count.
        self._chunks.append(data if 2 * len(data) >= len(data.obj) else bytes(data))
        self.size += len(data)
        self._pending += len(data)

    def drop(self, data: memoryview) -> None:
        """Count a fragment past the size cap without keeping it; forget what is in memory."""
        self.oversized = True
        self._chunks.clear()
        self._pending = 0
        self.size += len(data)

    def spill(self, spool_dir: Path) -> None:
        """Move the in-memory chunks to the spool file (blocking: run in an executor)."""
        if self.spool_path is None:
            spool_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="rx-", suffix=".spool", dir=spool_dir)
            os.close(fd)
            self.spool_path = Path(name)
        with open(self.spool_path, "ab") as spool:
            spool.writelines(self._chunks)
        self._chunks.clear()
        self._pending = 0

    def getvalue(self) -> bytes:
        """Return the whole data set as bytes (blocking if spooled: only for small ones)."""
        if self.spool_path is None:
            return b"".join(self._chunks)
        self.spill(self.spool_path.parent)
        return self.spool_path.read_bytes()

    def discard(self) -> None:
        """Forget the data and delete any spool file (blocking unlink)."""
        self._chunks.clear()
        self._pending = 0
        if self.spool_path is not None:
            self.spool_path.unlink(missing_ok=True)
            self.spool_path = None


@dataclass(slots=True)
class DimseMessage:
    """A complete DIMSE message: its presentation context, command set and data set."""

    context_id: int
    command: Command
    dataset: DataSet | None = None


@dataclass
class _Partial:
    context_id: int
    command_chunks: list[bytes] = field(default_factory=list)
    command: Command | None = None
    dataset: DataSet | None = None


class MessageAssembler:
    """Reassembles DIMSE messages from PDVs, one message at a time (PS3.8 9.3.5.1)."""

    def __init__(
        self, accepted_contexts: Container[int], spool_threshold: int, max_dataset_size: int
    ) -> None:
        self.accepted_contexts = accepted_contexts
        self.spool_threshold = spool_threshold
        self.max_dataset_size = max_dataset_size
        self._partial: _Partial | None = None

    @property
    def needs_spill(self) -> DataSet | None:
        """The data set in progress if it holds more in memory than the threshold."""
        partial = self._partial
        dataset = partial.dataset if partial is not None else None
        if dataset is not None and dataset.pending_bytes > self.spool_threshold:
            return dataset
        return None

    def discard(self) -> None:
        """Drop a message in progress (abort), deleting any spool file."""
        if self._partial is not None and self._partial.dataset is not None:
            self._partial.dataset.discard()
        self._partial = None

    def feed(self, pdvs: list[Pdv]) -> list[DimseMessage]:
        """Consume the PDVs of one P-DATA-TF; return the messages they completed."""
        if len(pdvs) == 1:
            # The usual P-DATA-TF: one PDV (PS3.8 9.3.5 allows several).
            message = self._feed_one(pdvs[0])
            return [] if message is None else [message]
        done: list[DimseMessage] = []
        for pdv in pdvs:
            message = self._feed_one(pdv)
            if message is not None:
                done.append(message)
        return done

    def _feed_one(self, pdv: Pdv) -> DimseMessage | None:
        if pdv.context_id not in self.accepted_contexts:
            raise PduError(f"PDV on presentation context {pdv.context_id}, which is not accepted")
        partial = self._partial
        if partial is None:
            if not pdv.is_command:
                raise PduError("data set fragment with no command before it")
            if pdv.is_last:
                # The usual case, a whole command set in one PDV: no reassembly needed.
                return self._command_complete(pdv.context_id, pdv.data)
            partial = self._partial = _Partial(pdv.context_id)
        elif partial.context_id != pdv.context_id:
            raise PduError(
                f"fragment on context {pdv.context_id} inside a message on {partial.context_id}"
            )
        if pdv.is_command:
            if partial.command is not None:
                raise PduError("command fragment after the command set was complete")
            partial.command_chunks.append(bytes(pdv.data))
            if not pdv.is_last:
                return None
            return self._command_complete(partial.context_id, b"".join(partial.command_chunks))
        if partial.dataset is None:
            raise PduError("data set fragment for a command that announced none")
        dataset = partial.dataset
        if dataset.size + len(pdv.data) <= self.max_dataset_size:
            dataset.append(pdv.data)
        elif dataset.size <= 2 * self.max_dataset_size:
            # Dropped, to be answered 0xA700 once the message ends (PS3.7 9.1.1.1.9).
            dataset.drop(pdv.data)
        else:
            raise PduError(f"data set still going at {dataset.size} bytes, over twice the cap")
        if not pdv.is_last:
            return None
        self._partial = None
        assert partial.command is not None
        return DimseMessage(partial.context_id, partial.command, partial.dataset)

    def _command_complete(self, context_id: int, raw: bytes | memoryview) -> DimseMessage | None:
        try:
            command = decode_command(raw)
        except CommandError as exc:
            raise PduError(f"bad command set: {exc}") from exc
        if has_dataset(command):
            # PS3.7 9.1: the data set follows in its own fragments on the same context.
            self._partial = _Partial(context_id, command=command, dataset=DataSet())
            return None
        self._partial = None
        return DimseMessage(context_id, command)


def fragment_size(peer_max_pdu: int, own_cap: int) -> int:
    """Largest even PDV payload for a peer's maximum PDU length (0 = unlimited)."""
    limit = own_cap if peer_max_pdu == 0 else min(peer_max_pdu, own_cap)
    # PDU length = 4 (item length) + 2 (context, control) + data; DCMTK wants even data.
    return max(2, (limit - 6) & ~1)


@dataclass(frozen=True, slots=True)
class FramedDataset:
    """A data set already cut into P-DATA-TF PDUs for one context and fragment size.

    Framing is pure, so a data set can be framed off the event loop (in the executor
    that read it) and sent later as it is.
    """

    context_id: int
    max_fragment: int
    pdus: tuple[bytes | memoryview, ...]


def frame_dataset(context_id: int, data: bytes | memoryview, max_fragment: int) -> FramedDataset:
    """Cut a data set into the PDUs `Association.send_message` would send for it."""
    pdus = tuple(encode_fragments(context_id, data, False, max_fragment))
    return FramedDataset(context_id, max_fragment, pdus)


def encode_fragments(
    context_id: int, data: bytes | memoryview, is_command: bool, max_fragment: int
) -> Iterator[bytes | memoryview]:
    """Yield P-DATA-TF PDUs (header and body separately) carrying `data`, one PDV each."""
    view = memoryview(data)
    if len(view) % 2:
        # PS3.5 7.1: a data set is even; an odd stream (e.g. deflated) gets one pad byte.
        view = memoryview(bytes(view) + b"\0")
    total = len(view)
    offset = 0
    while True:
        chunk = view[offset : offset + max_fragment]
        offset += len(chunk)
        is_last = offset >= total
        yield pdata_header(context_id, is_command, is_last, len(chunk))
        yield chunk
        if is_last:
            return
