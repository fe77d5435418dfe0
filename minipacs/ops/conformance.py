"""The DICOM Conformance Statement (PS3.2 structure), generated from the code's own tables.

Nothing here is typed by hand that the code already knows: SOP classes and transfer
syntaxes come from the acceptor's negotiation policy, Q/R keys from the index's key
table, limits and defaults from the settings, statuses from the services. A test
regenerates the document and compares it with docs/conformance.md, so the two cannot
drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from pydicom.uid import UID

from minipacs.config import Settings
from minipacs.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from minipacs.index import keys
from minipacs.net import access, guard, tls
from minipacs.net import negotiation as neg
from minipacs.net.operations import OUT_OF_RESOURCES
from minipacs.services import find, qr, retrieve, store

_SOURCES = {
    "column": "index column, matched in SQL",
    "integer": "index column (integer), matched in SQL",
    "modalities": "computed from the study's series",
    "sop_classes": "computed from the study's instances",
}


def _name(uid: str) -> str:
    return UID(uid).name or uid


def _table(header: tuple[str, ...], rows: Iterator[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _services() -> list[str]:
    storage = neg.STORAGE_SOP_CLASSES
    rows = [
        ("Verification", neg.VERIFICATION, "SCP", "C-ECHO"),
        *(
            row
            for model in keys.FIND_MODELS.values()
            for row in (
                (model.name + " Q/R FIND", model.find_uid, "SCP", "C-FIND"),
                (model.name + " Q/R MOVE", model.move_uid, "SCP", "C-MOVE"),
                (model.name + " Q/R GET", model.get_uid, "SCP", "C-GET"),
            )
        ),
    ]
    lines = ["## 2 AE specification: SOP classes", ""]
    lines += _table(("SOP class", "UID", "role", "DIMSE"), iter(rows))
    lines += [
        f"Storage, as SCP (C-STORE), for each of the {len(storage)} storage SOP classes "
        "pynetdicom knows; as SCU for the C-STORE sub-operations of C-MOVE (on a new "
        "association to a configured destination) and C-GET (on the requestor's own "
        "association, for the classes it took the SCP role for):",
        "",
    ]
    lines += _table(("SOP class", "UID"), ((_name(uid), uid) for uid in storage))
    lines += [
        "Patient/Study Only Q/R (1.2.840.10008.5.1.4.1.2.3.x) is retired (PS3.4 C.6.3) and "
        "refused per presentation context (abstract syntax not supported).",
        "",
    ]
    return lines


def _syntaxes() -> list[str]:
    lines = ["## 3 Transfer syntaxes", ""]
    lines += ["Verification and Query/Retrieve accept the uncompressed syntaxes:", ""]
    lines += _table(
        ("transfer syntax", "UID"), ((_name(u), u) for u in neg.UNCOMPRESSED_TRANSFER_SYNTAXES)
    )
    lines += ["Storage also accepts these, and stores each instance as it was sent:", ""]
    lines += _table(
        ("transfer syntax", "UID"), ((_name(u), u) for u in neg.ENCAPSULATED_TRANSFER_SYNTAXES)
    )
    return lines


def _association(settings: Settings) -> list[str]:
    server = settings.server
    rows = (
        ("Implementation Class UID", IMPLEMENTATION_CLASS_UID),
        ("Implementation Version Name", IMPLEMENTATION_VERSION_NAME),
        ("Application context", neg.APPLICATION_CONTEXT_NAME),
        ("AE title (default)", server.ae_title),
        ("Called AE title checked (default)", server.check_called_ae),
        ("Maximum PDU length received (default)", server.max_pdu_length),
        ("Concurrent associations (default)", server.max_associations),
        ("ARTIM timeout, s (default)", server.artim_timeout),
        ("Idle timeout, s (default)", server.idle_timeout),
        ("Asynchronous operations window", "1 invoked / 1 performed"),
        ("SCP/SCU role selection", "answered for storage SOP classes"),
    )
    lines = ["## 4 Association policies", ""]
    lines += _table(("item", "value"), iter(rows))
    lines += [
        "An association beyond a limit (`server.max_associations`, "
        "`server.max_associations_per_ae`, `server.associations_per_minute` per peer "
        f"address) is refused with A-ASSOCIATE-RJ {neg.REJECT_LOCAL_LIMIT} (result, source, "
        f"reason: transient, local limit); an unknown called AE with {neg.REJECT_CALLED_AE}; "
        "a calling AE refused by the access rules (section 7) with "
        f"{neg.REJECT_CALLING_AE}.",
        "",
        f"At most {server.max_pending_connections} connections (default) may be waiting "
        "for their A-ASSOCIATE-RQ or TLS handshake; past that the oldest is closed. ARTIM "
        "runs from the connection and is not restarted by partial PDUs. A data set over "
        f"`server.max_dataset_size` ({server.max_dataset_size} bytes, default) is not kept: "
        f"the request gets 0x{OUT_OF_RESOURCES:04X} with an Error Comment, and a peer "
        "still sending at twice the cap is aborted.",
        "",
    ]
    return lines


def _security(settings: Settings) -> list[str]:
    rows = (
        ("TLS profile", "PS3.15 B.10 Non-Downgrading BCP 195 (TLS 1.2 or later)"),
        ("TLS 1.2 cipher suites", tls.BCP195_CIPHERS.replace(":", ", ")),
        ("TLS port (default)", f"`tls.port`: {settings.tls.port or 'off'} (IANA 2762)"),
        ("Key management", "PEM certificate chain, key and CA bundle files; no CRL/OCSP"),
        ("Integrity failure", "the connection is closed (A-P-ABORT), logged and counted"),
        ("Client certificates", "verified against `tls.ca_file`; `tls.require_client_cert`"),
        ("Unknown calling AE (default)", settings.access.unknown_ae),
        ("User Identity (default)", settings.access.user_identity),
    )
    lines = ["## 7 Security", ""]
    lines += _table(("item", "value"), iter(rows))
    lines += [
        "DICOM TLS on its own port (`[tls]`) beside the plain one. As a requestor over TLS "
        "(for C-MOVE destinations with `tls = true`, once C-MOVE is served) minipacs "
        "offers the same certificate and verifies the peer's against `tls.ca_file`, its "
        "host name or address included. A failed handshake is logged and counted.",
        "",
        "Access control by calling AE title (`[access.<AE>]`: the services it may use of "
        f"{', '.join(access.SERVICES)}, the addresses it may call from, its own "
        "association limit) with a policy for AEs without a rule: allow, "
        f"refuse-association (A-ASSOCIATE-RJ {neg.REJECT_CALLING_AE}) or refuse-services. "
        f"A service not granted is answered 0x{guard.NOT_AUTHORIZED:04X} (Refused: Not "
        "Authorized) with an Error Comment; a call from an address not listed is rejected "
        f"with {neg.REJECT_CALLING_AE}. `server.allowed_calling_aes` is still read: its "
        "titles may do everything, any other is refused at association.",
        "",
        "User Identity negotiation (PS3.7 D.3.3.7): types 1 (username) and 2 (username and "
        "passcode) are checked against `[users]` (salted scrypt hashes); types 3-5 are "
        f"refused. A failed check is rejected with {access.REJECT_IDENTITY} (permanent, ACSE, "
        "no reason given); the positive response is sent when asked for. Every refusal "
        "is logged and counted in the metrics.",
        "",
    ]
    return lines


def _statuses() -> list[str]:
    rows = (
        ("C-STORE", "0x0000", "stored durably and indexed"),
        ("C-STORE", f"0x{store.DUPLICATE_SOP_INSTANCE:04X}", "duplicate refused (policy)"),
        ("C-STORE", "0xA700", "out of resources (free space, write error, index, size cap)"),
        ("C-STORE", f"0x{store.DATASET_DOES_NOT_MATCH:04X}", "data set does not match"),
        ("C-STORE", f"0x{store.CANNOT_UNDERSTAND:04X}", "cannot understand"),
        ("C-FIND", "0xFF00 / 0xFF01", "pending / pending, a key not supported"),
        ("C-FIND", "0x0000 / 0xFE00", "success / cancelled"),
        ("C-FIND", "0xA700", "more than query.max_results matches"),
        ("C-FIND", f"0x{qr.IDENTIFIER_DOES_NOT_MATCH:04X}", "identifier does not match"),
        ("C-FIND", f"0x{qr.UNABLE_TO_PROCESS:04X}", "identifier cannot be decoded"),
        ("C-FIND", f"0x{find.INDEX_UNAVAILABLE:04X}", "index unavailable"),
        ("C-MOVE/C-GET", "0xFF00", "pending, with counts; paced by retrieve.pending_interval"),
        ("C-MOVE/C-GET", "0x0000 / 0xFE00", "all sub-operations completed / cancelled"),
        ("C-MOVE/C-GET", "0xB000", "some sub-operations failed (Failed SOP Instance UID List)"),
        ("C-MOVE/C-GET", "0xA702", "every sub-operation failed"),
        ("C-MOVE", f"0x{retrieve.MOVE_DESTINATION_UNKNOWN:04X}", "move destination unknown"),
        (
            "C-MOVE/C-GET",
            f"0x{qr.IDENTIFIER_DOES_NOT_MATCH:04X}",
            "identifier does not match (unique keys only, PS3.4 C.4.2.2.1)",
        ),
        ("any", f"0x{guard.NOT_AUTHORIZED:04X}", "refused: not authorized (access rules)"),
    )
    return ["### Statuses", "", *_table(("service", "status", "meaning"), iter(rows))]


def _query_keys() -> list[str]:
    lines = [
        "## 5 Query/Retrieve FIND",
        "",
        "Levels: Patient Root PATIENT, STUDY, SERIES, IMAGE; Study Root STUDY, SERIES, "
        "IMAGE. Hierarchical search (PS3.4 C.4.1.3.1.1): each level above the query level "
        "must be given its unique key with a single value. Relational queries are not "
        "offered.",
        "",
        "Matching (PS3.4 C.2.2.2): single value, universal, wildcard (`*`, `?`), range "
        "(DA, TM, DT; a date range with a time range matches as one date-time range), list "
        "of UIDs, sequence (items matched against the stored header). Person names match "
        "per component group, case-insensitively unless `query.pn_case_insensitive` is "
        "false. Keys with an index column are matched in SQL; every other key is matched "
        "and returned from the stored header of the entity (the first instance stored in "
        "it). A key below the query level is returned empty with status 0xFF01.",
        "",
        "Keys held by the index:",
        "",
    ]
    rows = ((key.keyword, key.level, _SOURCES[key.source]) for key in keys.indexed_keys())
    lines += _table(("key", "level", "source"), rows)
    return lines


def _settings_table(settings: Settings) -> list[str]:
    lines = ["## 6 Configuration (defaults)", ""]
    rows = []
    for section in ("server", "storage", "database", "query", "retrieve", "tls", "access"):
        values = getattr(settings, section)
        for item in dataclasses.fields(values):
            if item.repr:
                rows.append((f"{section}.{item.name}", getattr(values, item.name)))
    lines += _table(("setting", "default"), iter(rows))
    return lines


def conformance_statement() -> str:
    """The conformance statement as Markdown, for the built-in default settings."""
    settings = Settings()
    lines = [
        "# minipacs DICOM Conformance Statement",
        "",
        "Generated by `minipacs conformance` from the code's own tables; do not edit.",
        "",
        "## 1 Implementation model",
        "",
        "One Application Entity, a storage and query/retrieve SCP: modalities store "
        "instances with C-STORE (written durably to a filesystem store and indexed in SQL "
        "before Success is returned); workstations query them with C-FIND and retrieve "
        "them with C-MOVE (to a destination from the configuration) or C-GET. One asyncio "
        "event loop serves every association.",
        "",
        *_services(),
        *_syntaxes(),
        *_association(settings),
        *_query_keys(),
        *_statuses(),
        *_settings_table(settings),
        *_security(settings),
        "## 8 Character sets",
        "",
        "Every Specific Character Set pydicom decodes (single-byte ISO 8859 sets, ISO 2022 "
        "code extensions for Japanese, Korean and Chinese, UTF-8, GB18030, GBK). Responses "
        "carry the client's character set when it can hold every value, else ISO_IR 192.",
    ]
    return "\n".join(lines) + "\n"
