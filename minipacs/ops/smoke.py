"""Small DICOM clients for smoke tests: C-ECHO, C-STORE of files, C-FIND, on our requestor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from minipacs import dataset as dicom
from minipacs.index.keys import PATIENT_ROOT, STUDY_ROOT
from minipacs.net.client import ClientAssociation
from minipacs.net.commands import C_FIND_RQ, DATASET_PRESENT, PRIORITY_MEDIUM
from minipacs.net.negotiation import UNCOMPRESSED_TRANSFER_SYNTAXES, VERIFICATION
from minipacs.net.operations import is_pending


@dataclass(frozen=True)
class Peer:
    """Where a smoke test goes, and as whom."""

    host: str
    port: int
    called_ae: str = "MINIPACS"
    calling_ae: str = "MINIPACS-CLI"
    timeout: float = 30.0


async def _connect(peer: Peer, contexts: list[tuple[str, list[str]]]) -> ClientAssociation:
    return await ClientAssociation.connect(
        peer.host,
        peer.port,
        calling_ae=peer.calling_ae,
        called_ae=peer.called_ae,
        contexts=contexts,
        connect_timeout=peer.timeout,
    )


async def echo(peer: Peer) -> int:
    """Send one C-ECHO; return its status."""
    async with asyncio.timeout(peer.timeout):
        association = await _connect(peer, [(VERIFICATION, list(UNCOMPRESSED_TRANSFER_SYNTAXES))])
        async with association:
            return await association.echo()


@dataclass(frozen=True)
class StoreResult:
    """The outcome of sending one file."""

    path: Path
    status: int | None
    error: str = ""


def _read(path: Path) -> Dataset | str:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as exc:
        return f"not a DICOM file: {exc}"


async def store(peer: Peer, paths: Iterable[Path]) -> AsyncIterator[StoreResult]:
    """Send each file in its own transfer syntax over one association; yield outcomes."""
    files: list[tuple[Path, Dataset]] = []
    for path in paths:
        read = await asyncio.to_thread(_read, path)
        if isinstance(read, str):
            yield StoreResult(path, None, read)
        else:
            files.append((path, read))
    if not files:
        return
    proposal = sorted(
        {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _p, ds in files}
    )
    contexts = [(sop_class, [syntax]) for sop_class, syntax in proposal]
    async with asyncio.timeout(peer.timeout * (1 + len(files))):
        association = await _connect(peer, contexts)
        async with association:
            for path, ds in files:
                syntax = str(ds.file_meta.TransferSyntaxUID)
                try:
                    context_id = association.context_for(str(ds.SOPClassUID), syntax)
                except LookupError:
                    yield StoreResult(path, None, "the peer accepted no context for it")
                    continue
                raw = await asyncio.to_thread(dicom.part10_body, path)
                response = await association.store(
                    context_id, str(ds.SOPClassUID), str(ds.SOPInstanceUID), raw
                )
                yield StoreResult(path, int(response["Status"]))  # type: ignore[call-overload]


async def find(
    peer: Peer, identifier: Dataset, patient_root: bool = False
) -> AsyncIterator[tuple[int, Dataset | None]]:
    """Send one C-FIND; yield (status, identifier) per response, the final one last."""
    model = PATIENT_ROOT if patient_root else STUDY_ROOT
    syntax = UNCOMPRESSED_TRANSFER_SYNTAXES[0]
    async with asyncio.timeout(peer.timeout):
        association = await _connect(peer, [(model.find_uid, [syntax])])
        async with association:
            context_id = association.context_for(model.find_uid)
            command = {
                "CommandField": C_FIND_RQ,
                "AffectedSOPClassUID": model.find_uid,
                "Priority": PRIORITY_MEDIUM,
                "CommandDataSetType": DATASET_PRESENT,
            }
            raw = dicom.encode(identifier, syntax)
            async for response in association.request(context_id, command, raw):
                status = int(response.command["Status"])  # type: ignore[call-overload]
                found = None
                if is_pending(status) and response.dataset is not None:
                    found = dicom.read_header(response.dataset.getvalue(), syntax)
                yield status, found
