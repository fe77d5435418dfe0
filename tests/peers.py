"""pynetdicom peers for trust and robustness tests: echo, store, find, each time-bounded."""

from __future__ import annotations

import asyncio

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from minipacs.net import negotiation as neg
from minipacs.net.client import AssociationRefused, ClientAssociation

TIMEOUT = 20
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def ct_dataset(uid_suffix: str = "1") -> Dataset:
    """pydicom's CT_small with a fresh SOP Instance UID."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1234.77.{uid_suffix}"
    return ds


def associate(
    port: int, calling: str = "PEER", identity: UserIdentityNegotiation | None = None
) -> Association:
    """An association proposing Verification, CT storage and Study Root FIND."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(neg.VERIFICATION)
    ae.add_requested_context(CT_IMAGE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    return ae.associate(
        "127.0.0.1", port, ae_title="MINIPACS", ext_neg=[identity] if identity else None
    )


def identity(user: str, passcode: str | None = None) -> UserIdentityNegotiation:
    """A User Identity item asking for a positive response (PS3.7 D.3.3.7.1)."""
    item = UserIdentityNegotiation()
    item.user_identity_type = 1 if passcode is None else 2
    item.primary_field = user.encode()
    if passcode is not None:
        item.secondary_field = passcode.encode()
    item.positive_response_requested = True
    return item


def rejection(
    port: int, calling: str = "PEER", identity: UserIdentityNegotiation | None = None
) -> tuple[int, int, int] | None:
    """The A-ASSOCIATE-RJ (result, source, reason) our client gets, or None if accepted."""

    async def attempt() -> tuple[int, int, int] | None:
        try:
            assoc = await ClientAssociation.connect(
                "127.0.0.1",
                port,
                calling_ae=calling,
                called_ae="MINIPACS",
                contexts=[(neg.VERIFICATION, neg.UNCOMPRESSED_TRANSFER_SYNTAXES)],
                connect_timeout=TIMEOUT,
                user_identity=identity,
            )
        except AssociationRefused as refused:
            assert refused.reject is not None, str(refused)
            return refused.reject
        await assoc.release()
        return None

    return asyncio.run(asyncio.wait_for(attempt(), TIMEOUT))


def statuses(assoc: Association, dataset: Dataset | None = None) -> dict[str, Dataset]:
    """Echo, store (dataset or a CT) and find on one association; the final statuses."""
    try:
        echo = assoc.send_c_echo()
        store = assoc.send_c_store(dataset if dataset is not None else ct_dataset())
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        finds = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        return {"echo": echo, "store": store, "find": finds[-1][0]}
    finally:
        assoc.release()


def served(port: int, calling: str = "PEER") -> None:
    """Assert that a normal client is served: echo, store and find all succeed."""
    assoc = associate(port, calling)
    assert assoc.is_established, f"not associated: {assoc}"
    result = statuses(assoc)
    assert {name: int(status.Status) for name, status in result.items()} == {
        "echo": 0,
        "store": 0,
        "find": 0,
    }
