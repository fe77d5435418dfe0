"""C-STORE end to end: real peers (DCMTK, our client) against the real daemon and index."""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from minipacs import dataset as dicom
from minipacs.index.db import make_engine
from minipacs.index.models import Instance, Patient, Series, Study
from minipacs.net.client import ClientAssociation
from minipacs.net.negotiation import STORAGE_SOP_CLASSES
from minipacs.net.session import Timeouts
from tests.dicom_tools import dcmtk, echoscu
from tests.servers import MinipacsProcess, start_minipacs

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CALLING = "STORETEST"
NET_TIMEOUT = 30.0

# storescu option that makes it propose (besides all uncompressed ones) each encapsulated syntax.
STORESCU_PROPOSAL = {
    "1.2.840.10008.1.2": "-x=",
    "1.2.840.10008.1.2.1": "-x=",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
}

# Test files the archive must refuse: structurally broken data sets (decided per file).
EXPECTED_REFUSALS: dict[str, str] = {}


@dataclass
class Candidate:
    """A pydicom test file that is a composite instance the archive should take."""

    path: Path
    dataset: Dataset
    transfer_syntax: str
    sop_class: str
    sop_instance: str


def _read(path: Path) -> Dataset | None:
    """Read a DICOM file fully, or None when pydicom cannot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            ds.walk(lambda _ds, _elem: None)
        return ds
    except Exception:
        return None


def composite_test_files() -> list[Candidate]:
    """Every readable composite instance of an accepted SOP class in pydicom's test files."""
    candidates: list[Candidate] = []
    seen: set[str] = set()
    for path in sorted(TEST_FILES.rglob("*.dcm")):
        ds = _read(path)
        if ds is None or "DirectoryRecordSequence" in ds:
            continue
        keys = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if any(not str(ds.get(key, "") or "").strip() for key in keys):
            continue
        if str(ds.SOPClassUID) not in STORAGE_SOP_CLASSES:
            continue
        meta = getattr(ds, "file_meta", None)
        syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
        if not syntax:
            syntax = _syntax_of(ds)
        if str(ds.SOPInstanceUID) in seen:
            continue  # the same instance in two files would be a duplicate store
        seen.add(str(ds.SOPInstanceUID))
        candidates.append(Candidate(path, ds, syntax, str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return candidates


def _syntax_of(ds: Dataset) -> str:
    """The transfer syntax pydicom read a file meta-less data set in."""
    implicit, little = ds.is_implicit_VR, ds.is_little_endian
    if not little:
        return "1.2.840.10008.1.2.2"
    return "1.2.840.10008.1.2" if implicit else ExplicitVRLittleEndian


def store_files(files: list[Path], port: int, option: str) -> subprocess.CompletedProcess[str]:
    """Send files with one storescu association proposing the given syntaxes."""
    return dcmtk(
        "storescu",
        "-nh",
        "-to",
        "10",
        "-ta",
        "10",
        "-td",
        "30",
        option,
        "-aet",
        CALLING,
        "-aec",
        "MINIPACS",
        "127.0.0.1",
        str(port),
        *(str(f) for f in files),
        timeout=300,
    )


async def store_one(
    port: int,
    sop_class: str,
    sop_instance: str,
    data: bytes,
    transfer_syntax: str = ExplicitVRLittleEndian,
    context_class: str | None = None,
) -> dict[str, object]:
    """Store one encoded data set with our client; return the response command set."""
    async with asyncio.timeout(NET_TIMEOUT):
        assoc = await ClientAssociation.connect(
            "127.0.0.1",
            port,
            calling_ae=CALLING,
            called_ae="MINIPACS",
            contexts=[(context_class or sop_class, [transfer_syntax])],
            timeouts=Timeouts(),
            connect_timeout=10,
        )
        async with assoc:
            context_id = assoc.context_for(context_class or sop_class, transfer_syntax)
            return dict(await assoc.store(context_id, sop_class, sop_instance, data))


def encode_for(ds: Dataset, transfer_syntax: str) -> bytes:
    """Encode a data set (without File Meta) in transfer_syntax."""
    body = Dataset({tag: elem for tag, elem in ds.items() if tag.group != 0x0002})
    return dicom.encode(body, transfer_syntax)


def instance_files(store: Path) -> set[Path]:
    """All committed instance files under a store folder."""
    return {
        p
        for p in store.rglob("*.dcm")
        if not any(part in (".tmp", ".spool") for part in p.relative_to(store).parts)
    }


def temp_leftovers(store: Path) -> list[Path]:
    """Anything left in the store's temp or spool folders."""
    return [p for d in (".tmp", ".spool") if (store / d).is_dir() for p in (store / d).iterdir()]


def index_rows(url: str) -> dict[str, dict[str, object]]:
    """Every instance row with its patient, study and series keys, by SOP Instance UID."""
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            query = (
                select(Instance, Series.modality, Series.series_uid, Study.study_uid, Patient)
                .join(Series, Instance.series_fk == Series.id)
                .join(Study, Series.study_fk == Study.id)
                .join(Patient, Study.patient_fk == Patient.id)
            )
            rows = {}
            for instance, modality, series_uid, study_uid, patient in session.execute(query):
                rows[instance.sop_uid] = {
                    "sop_class_uid": instance.sop_class_uid,
                    "transfer_syntax": instance.transfer_syntax,
                    "rel_path": instance.rel_path,
                    "size": instance.size,
                    "calling_ae": instance.calling_ae,
                    "modality": modality,
                    "series_uid": series_uid,
                    "study_uid": study_uid,
                    "patient_id": patient.patient_id,
                    "patient_name": patient.patient_name,
                }
            return rows
    finally:
        engine.dispose()


def instance_count(url: str) -> int:
    """How many instance rows the index holds."""
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            return int(session.scalar(select(func.count()).select_from(Instance)) or 0)
    finally:
        engine.dispose()


def body_of(ds: Dataset) -> dict[object, object]:
    """Data set elements outside group 0002, as comparable (VR, value) pairs.

    Group lengths (gggg,0000) and trailing padding (FFFC,FFFC) are left out: DCMTK drops
    them (PS3.5 7.2, 7.8); an odd-length byte value gets the even padding DCMTK adds.
    """
    body = {}
    for tag in list(ds.keys()):
        if tag.group == 0x0002 or tag.element == 0x0000 or tag == 0xFFFCFFFC:
            continue
        value = ds[tag].value
        if isinstance(value, bytes) and len(value) % 2:
            value += b"\0"
        # Encapsulated Pixel Data is OB (PS3.5 A.4); some test files say OW.
        vr = "OB or OW" if tag == 0x7FE00010 else ds[tag].VR
        body[tag] = (vr, value)
    return body


def test_every_pydicom_test_file_round_trips(archive: MinipacsProcess) -> None:
    candidates = composite_test_files()
    assert len(candidates) > 25
    by_syntax: dict[str, list[Candidate]] = {}
    by_client: list[Candidate] = []
    for candidate in candidates:
        meta = getattr(candidate.dataset, "file_meta", None)
        if candidate.transfer_syntax in STORESCU_PROPOSAL and "TransferSyntaxUID" in (meta or {}):
            by_syntax.setdefault(candidate.transfer_syntax, []).append(candidate)
        else:
            by_client.append(candidate)
    outputs = []
    for syntax, group in by_syntax.items():
        result = store_files([c.path for c in group], archive.port, STORESCU_PROPOSAL[syntax])
        outputs.append(f"{syntax}: rc={result.returncode}\n{result.stdout}{result.stderr}")
    # storescu cannot send some files (SOP classes it does not know, files DCMTK cannot
    # parse): those, and any it sent that were refused, go again with our client in the
    # file's own syntax, which also tells the status and reason of a refusal.
    rows = index_rows(archive.database_url)
    refused: dict[str, str] = {}
    for candidate in by_client + [c for c in candidates if c not in by_client]:
        if candidate.sop_instance in rows:
            continue
        data = encode_for(candidate.dataset, candidate.transfer_syntax)
        response = asyncio.run(
            store_one(
                archive.port,
                candidate.sop_class,
                candidate.sop_instance,
                data,
                candidate.transfer_syntax,
            )
        )
        status = int(response["Status"])  # type: ignore[call-overload]
        if status != 0:
            comment = response.get("ErrorComment", "")
            refused[candidate.path.name] = f"status 0x{status:04X}: {comment}"
    store = archive.workdir / "store"
    rows = index_rows(archive.database_url)
    unexpected = {k: v for k, v in refused.items() if k not in EXPECTED_REFUSALS}
    missing = set(EXPECTED_REFUSALS) - set(refused)
    assert not unexpected and not missing, (
        f"refused: {refused}\nexpected refusals not refused: {missing}\n" + "\n".join(outputs)
    )

    accepted = [c for c in candidates if c.path.name not in EXPECTED_REFUSALS]
    assert len(rows) == len(accepted)
    problems: list[str] = []
    for candidate in accepted:
        row = rows[candidate.sop_instance]
        ds = candidate.dataset
        expected = {
            "sop_class_uid": candidate.sop_class,
            "transfer_syntax": candidate.transfer_syntax,
            "patient_id": str(ds.get("PatientID", "") or ""),
            "study_uid": str(ds.StudyInstanceUID),
            "series_uid": str(ds.SeriesInstanceUID),
            "modality": str(ds.get("Modality", "") or ""),
            "calling_ae": CALLING,
        }
        got = {key: row[key] for key in expected}
        if got != expected:
            problems.append(f"{candidate.path.name}: row {got} != {expected}")
            continue
        path = store / str(row["rel_path"])
        if not path.is_file() or path.stat().st_size != row["size"]:
            problems.append(f"{candidate.path.name}: {path} missing or of the wrong size")
            continue
        stored = pydicom.dcmread(path)
        if stored.file_meta.TransferSyntaxUID != candidate.transfer_syntax:
            problems.append(
                f"{candidate.path.name}: stored as {stored.file_meta.TransferSyntaxUID}"
            )
        if stored.file_meta.get("SourceApplicationEntityTitle", "").strip() != CALLING:
            problems.append(f"{candidate.path.name}: Source AE {stored.file_meta}")
        original, copy = body_of(ds), body_of(stored)
        if original != copy:
            diff = [
                str(tag)
                for tag in sorted(set(original) | set(copy))
                if original.get(tag) != copy.get(tag)
            ]
            problems.append(f"{candidate.path.name}: elements differ: {diff[:10]}")
    assert not problems, "\n".join(problems)
    assert len(instance_files(store)) == len(accepted)
    assert temp_leftovers(store) == []


def _ct_small() -> Dataset:
    """CT_small from pydicom's test files."""
    return pydicom.dcmread(TEST_FILES / "CT_small.dcm")


def _fresh_ct(**changes: str) -> Dataset:
    """CT_small with new UIDs and the given attribute values."""
    ds = _ct_small()
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def _bad_cases() -> Iterator[tuple[str, str, str, bytes]]:
    """(name, command SOP class, command SOP instance, data set bytes) of refused stores."""
    ds = _fresh_ct(SOPInstanceUID="1.2.abc")
    yield "malformed-uid", CT_IMAGE, "1.2.abc", encode_for(ds, ExplicitVRLittleEndian)
    ds = _fresh_ct(SOPInstanceUID="../../etc/passwd")
    yield "path-uid", CT_IMAGE, "../../etc/passwd", encode_for(ds, ExplicitVRLittleEndian)
    ds = _fresh_ct()
    del ds.StudyInstanceUID
    yield "no-study-uid", CT_IMAGE, ds.SOPInstanceUID, encode_for(ds, ExplicitVRLittleEndian)
    ds = _fresh_ct()
    data = encode_for(ds, ExplicitVRLittleEndian)[:-100]
    yield "truncated", CT_IMAGE, ds.SOPInstanceUID, data
    ds = _fresh_ct(SOPClassUID=MR_IMAGE)
    yield "class-mismatch", MR_IMAGE, ds.SOPInstanceUID, encode_for(ds, ExplicitVRLittleEndian)
    ds = _fresh_ct()
    yield "instance-mismatch", CT_IMAGE, generate_uid(), encode_for(ds, ExplicitVRLittleEndian)


@pytest.mark.parametrize("case", [name for name, *_ in _bad_cases()])
def test_bad_data_sets_are_refused(archive: MinipacsProcess, case: str) -> None:
    name, sop_class, sop_instance, data = next(c for c in _bad_cases() if c[0] == case)
    store = archive.workdir / "store"
    before_files = instance_files(store)
    before_rows = instance_count(archive.database_url)
    response = asyncio.run(
        store_one(archive.port, sop_class, sop_instance, data, context_class=CT_IMAGE)
    )
    status = int(response["Status"])  # type: ignore[call-overload]
    assert status >= 0xA000, f"{name}: status 0x{status:04X}"
    assert str(response.get("ErrorComment", "")).strip(), f"{name}: no Error Comment"
    assert instance_files(store) == before_files
    assert temp_leftovers(store) == []
    assert instance_count(archive.database_url) == before_rows
    assert not (archive.workdir / "etc").exists()

    good = _fresh_ct()
    response = asyncio.run(
        store_one(
            archive.port, CT_IMAGE, good.SOPInstanceUID, encode_for(good, ExplicitVRLittleEndian)
        )
    )
    assert int(response["Status"]) == 0  # type: ignore[call-overload]
    assert instance_count(archive.database_url) == before_rows + 1
    assert len(instance_files(store)) == len(before_files) + 1


def _store_twice(
    process: MinipacsProcess, **second_changes: object
) -> tuple[int, int, Dataset, Dataset]:
    """Store an instance, then the same instance with another PatientName; return statuses."""
    first = _fresh_ct(PatientName="First^Sent")
    second = copy.deepcopy(first)
    second.PatientName = "Second^Sent"
    for keyword, value in second_changes.items():
        setattr(second, keyword, value)
    statuses = []
    for ds in (first, second):
        response = asyncio.run(
            store_one(
                process.port,
                CT_IMAGE,
                ds.SOPInstanceUID,
                encode_for(ds, ExplicitVRLittleEndian),
            )
        )
        statuses.append(int(response["Status"]))  # type: ignore[call-overload]
    return statuses[0], statuses[1], first, second


def _stored(process: MinipacsProcess, sop_uid: str) -> tuple[dict[str, object], Dataset]:
    """The single index row of an instance and its parsed file."""
    rows = index_rows(process.database_url)
    assert list(rows) == [sop_uid]
    row = rows[sop_uid]
    return row, pydicom.dcmread(process.workdir / "store" / str(row["rel_path"]))


def _own_server(tmp_path: Path, **env: str) -> MinipacsProcess:
    """A daemon on SQLite in tmp_path with extra settings."""
    return start_minipacs(tmp_path, {"MINIPACS_STORAGE_MIN_FREE_BYTES": "0", **env})


def test_duplicate_keep_first(archive: MinipacsProcess) -> None:
    first_status, second_status, first, _ = _store_twice(archive)
    assert (first_status, second_status) == (0, 0)
    row, stored = _stored(archive, first.SOPInstanceUID)
    assert row["patient_name"] == "First^Sent"
    assert stored.PatientName == "First^Sent"
    assert body_of(stored) == body_of(first)
    assert len(instance_files(archive.workdir / "store")) == 1


def test_duplicate_reject(tmp_path: Path) -> None:
    process = _own_server(tmp_path, MINIPACS_STORAGE_DUPLICATE_POLICY="reject")
    try:
        first_status, second_status, first, _ = _store_twice(process)
        assert (first_status, second_status) == (0, 0x0111)
        row, stored = _stored(process, first.SOPInstanceUID)
        assert row["patient_name"] == "First^Sent"
        assert stored.PatientName == "First^Sent"
        assert len(instance_files(tmp_path / "store")) == 1
    finally:
        assert process.stop() == 0


@pytest.mark.parametrize(("policy", "status"), [("keep-first", 0), ("reject", 0x0111)])
def test_duplicate_under_another_series_keeps_the_first(
    tmp_path: Path, policy: str, status: int
) -> None:
    # The second copy's path differs (the series is part of it), so no file is at its path
    # when it arrives: the index's duplicate check must refuse it and its file must go.
    process = _own_server(tmp_path, MINIPACS_STORAGE_DUPLICATE_POLICY=policy)
    try:
        first_status, second_status, first, _ = _store_twice(
            process, SeriesInstanceUID=generate_uid()
        )
        assert (first_status, second_status) == (0, status)
        row, stored = _stored(process, first.SOPInstanceUID)
        assert row["patient_name"] == "First^Sent"
        assert stored.SeriesInstanceUID == first.SeriesInstanceUID
        assert len(instance_files(tmp_path / "store")) == 1
        assert temp_leftovers(tmp_path / "store") == []
    finally:
        assert process.stop() == 0


def test_duplicate_replace(tmp_path: Path) -> None:
    process = _own_server(tmp_path, MINIPACS_STORAGE_DUPLICATE_POLICY="replace")
    try:
        first_status, second_status, _, second = _store_twice(process)
        assert (first_status, second_status) == (0, 0)
        row, stored = _stored(process, second.SOPInstanceUID)
        assert row["patient_name"] == "Second^Sent"
        assert stored.PatientName == "Second^Sent"
        assert body_of(stored) == body_of(second)
        assert len(instance_files(tmp_path / "store")) == 1
        assert temp_leftovers(tmp_path / "store") == []
    finally:
        assert process.stop() == 0


def test_free_space_floor_refuses_stores(tmp_path: Path) -> None:
    process = start_minipacs(tmp_path, {"MINIPACS_STORAGE_MIN_FREE_BYTES": str(1 << 50)})
    try:
        ds = _fresh_ct()
        response = asyncio.run(
            store_one(
                process.port,
                CT_IMAGE,
                ds.SOPInstanceUID,
                encode_for(ds, ExplicitVRLittleEndian),
            )
        )
        assert int(response["Status"]) == 0xA700  # type: ignore[call-overload]
        assert str(response.get("ErrorComment", "")).strip()
        assert instance_files(tmp_path / "store") == set()
        assert temp_leftovers(tmp_path / "store") == []
        assert instance_count(process.database_url) == 0
        assert echoscu(process.port) == 0
    finally:
        assert process.stop() == 0


CLIENTS = 8
PER_CLIENT = 1000


@pytest.fixture(scope="module")
def bulk_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """8 folders of 1,000 small distinct CT instances each."""
    base = _ct_small()
    base.Rows = base.Columns = 64
    base.BitsAllocated = base.BitsStored = 16
    base.HighBit = 15
    base.PixelData = bytes(64 * 64 * 2)
    base.StudyInstanceUID = generate_uid()
    dirs = []
    for client in range(CLIENTS):
        folder = tmp_path_factory.mktemp(f"bulk{client}")
        base.SeriesInstanceUID = generate_uid()
        for number in range(PER_CLIENT):
            base.SOPInstanceUID = generate_uid()
            base.InstanceNumber = number + 1
            base.save_as(folder / f"{number:04d}.dcm", enforce_file_format=True)
        dirs.append(folder)
    return dirs


@pytest.mark.timeout(600)
def test_eight_concurrent_storescu_associations(
    archive: MinipacsProcess, bulk_dirs: list[Path]
) -> None:
    command = ["storescu", "-to", "10", "-ta", "10", "-td", "60", "-aet", CALLING]
    command += ["-aec", "MINIPACS", "127.0.0.1", str(archive.port)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    processes = [
        subprocess.Popen(
            [*command, "+sd", str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for folder in bulk_dirs
    ]
    outputs = []
    try:
        for process in processes:
            out, _ = process.communicate(timeout=600)
            outputs.append((process.returncode, out))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(5)
    assert [rc for rc, _ in outputs] == [0] * CLIENTS, outputs
    assert instance_count(archive.database_url) == CLIENTS * PER_CLIENT
    store = archive.workdir / "store"
    assert len(instance_files(store)) == CLIENTS * PER_CLIENT
    assert temp_leftovers(store) == []
