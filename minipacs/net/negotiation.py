"""Presentation-context and user-information negotiation (PS3.8 7.1.1, PS3.7 D.3.3).

pynetdicom's `negotiate_as_acceptor` does the per-context work; it costs ~12 ms for 128
proposed contexts, and a modality sends the same proposal on every association, so
results are cached by the proposal's content.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from pydicom import uid as ts
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import (
    PresentationContext,
    negotiate_as_acceptor,
    negotiate_as_requestor,
)
from pynetdicom.sop_class import _QR_CLASSES, _STORAGE_CLASSES, _VERIFICATION_CLASSES

from minipacs.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

APPLICATION_CONTEXT_NAME: Final = "1.2.840.10008.3.1.1.1"

VERIFICATION: Final = _VERIFICATION_CLASSES["Verification"]

UNCOMPRESSED_TRANSFER_SYNTAXES: Final = (
    ts.ExplicitVRLittleEndian,
    ts.ImplicitVRLittleEndian,
    ts.DeflatedExplicitVRLittleEndian,
    ts.ExplicitVRBigEndian,
)
ENCAPSULATED_TRANSFER_SYNTAXES: Final = (
    ts.JPEGBaseline8Bit,
    ts.JPEGExtended12Bit,
    ts.JPEGLossless,
    ts.JPEGLosslessSV1,
    ts.JPEGLSLossless,
    ts.JPEGLSNearLossless,
    ts.JPEG2000Lossless,
    ts.JPEG2000,
    ts.JPEG2000MCLossless,
    ts.JPEG2000MC,
    ts.HTJ2KLossless,
    ts.HTJ2KLosslessRPCL,
    ts.HTJ2K,
    ts.RLELossless,
)
STORAGE_TRANSFER_SYNTAXES: Final = UNCOMPRESSED_TRANSFER_SYNTAXES + ENCAPSULATED_TRANSFER_SYNTAXES

STORAGE_SOP_CLASSES: Final = tuple(sorted(set(_STORAGE_CLASSES.values())))
# Patient/Study Only (1.2.840.10008.5.1.4.1.2.3.x) is retired (PS3.4 C.6.3): not offered,
# so a proposal of it is rejected per context with "abstract syntax not supported".
QUERY_RETRIEVE_SOP_CLASSES: Final = tuple(
    _QR_CLASSES[f"{root}QueryRetrieveInformationModel{service}"]
    for root in ("PatientRoot", "StudyRoot")
    for service in ("Find", "Move", "Get")
)

# Reasons of A-ASSOCIATE-RJ, PS3.8 9.3.4 Table 9-21: (result, source, reason).
REJECT_NO_REASON: Final = (1, 1, 1)
REJECT_APPLICATION_CONTEXT: Final = (1, 1, 2)
REJECT_CALLING_AE: Final = (1, 1, 3)
REJECT_CALLED_AE: Final = (1, 1, 7)
REJECT_PROTOCOL_VERSION: Final = (1, 2, 2)
REJECT_LOCAL_LIMIT: Final = (2, 3, 2)
REJECT_CONGESTION: Final = (2, 2, 1)


@dataclass(frozen=True, slots=True)
class AcceptedContext:
    """An accepted presentation context, with the roles each side may play."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    # From our side: we may act as SCP (answer requests) / as SCU (send requests, C-GET).
    we_are_scp: bool
    we_are_scu: bool


@dataclass(frozen=True)
class Negotiated:
    """The outcome of negotiation: what goes in the A-ASSOCIATE-AC and what was accepted."""

    results: list[PresentationContext]
    role_replies: list[SCP_SCU_RoleSelectionNegotiation]
    accepted: dict[int, AcceptedContext]


def _supported(
    syntaxes: Iterable[tuple[str, Sequence[str]]], roles: bool
) -> list[PresentationContext]:
    contexts = []
    for abstract, transfer in syntaxes:
        context = PresentationContext()
        context.abstract_syntax = abstract
        context.transfer_syntax = list(transfer)
        if roles:
            # Needed for pynetdicom to answer role selection (C-GET) at all.
            context.scu_role = True
            context.scp_role = True
        contexts.append(context)
    return contexts


class AcceptorPolicy:
    """What the server accepts, with a cache of negotiation results per proposal."""

    def __init__(self, cache_size: int = 256) -> None:
        self._contexts = (
            _supported(((VERIFICATION, UNCOMPRESSED_TRANSFER_SYNTAXES),), roles=False)
            + _supported(
                ((uid, UNCOMPRESSED_TRANSFER_SYNTAXES) for uid in QUERY_RETRIEVE_SOP_CLASSES),
                roles=False,
            )
            + _supported(
                ((uid, STORAGE_TRANSFER_SYNTAXES) for uid in STORAGE_SOP_CLASSES), roles=True
            )
        )
        self._cache: OrderedDict[tuple[object, ...], Negotiated] = OrderedDict()
        self._cache_size = cache_size

    @property
    def contexts(self) -> list[PresentationContext]:
        """Every abstract syntax we accept, with its transfer syntaxes."""
        return self._contexts

    def negotiate(
        self,
        proposed: Sequence[PresentationContext],
        roles: dict[str, tuple[bool, bool]],
    ) -> Negotiated:
        """Answer a proposal (contexts and role selections), from the cache when seen."""
        key = (
            tuple((c.context_id, c.abstract_syntax, tuple(c.transfer_syntax)) for c in proposed),
            tuple(sorted(roles.items())),
        )
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        results, role_replies = negotiate_as_acceptor(list(proposed), self._contexts, roles or None)
        accepted = {}
        for result in results:
            if result.result != 0:
                continue
            scu_role, scp_role = roles.get(result.abstract_syntax, (True, False))
            # PS3.7 D.3.3.4: without role selection the requestor is SCU, we are SCP.
            accepted[result.context_id] = AcceptedContext(
                result.context_id,
                str(result.abstract_syntax),
                str(result.transfer_syntax[0]),
                we_are_scp=scu_role or result.abstract_syntax not in roles,
                we_are_scu=bool(scp_role) and result.abstract_syntax in roles,
            )
        negotiated = Negotiated(results, role_replies, accepted)
        self._cache[key] = negotiated
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return negotiated


def role_proposals(user_information: Iterable[object]) -> dict[str, tuple[bool, bool]]:
    """SCP/SCU role selection items of an A-ASSOCIATE-RQ as {SOP class: (scu, scp)}."""
    roles = {}
    for item in user_information:
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
            roles[str(item.sop_class_uid)] = (bool(item.scu_role), bool(item.scp_role))
    return roles


def peer_max_pdu(user_information: Iterable[object]) -> int:
    """The peer's Maximum Length Received (0 = unlimited), PS3.8 D.1."""
    for item in user_information:
        if isinstance(item, MaximumLengthNotification):
            return int(item.maximum_length_received or 0)
    return 0


def peer_implementation(user_information: Iterable[object]) -> tuple[str, str]:
    """The peer's implementation class UID and version name, for logs."""
    class_uid = version = ""
    for item in user_information:
        if isinstance(item, ImplementationClassUIDNotification):
            class_uid = str(item.implementation_class_uid or "")
        elif isinstance(item, ImplementationVersionNameNotification):
            version = str(item.implementation_version_name or "")
    return class_uid, version


def user_information_reply(
    max_pdu: int,
    requested: Iterable[object],
    role_replies: Sequence[object],
    identity_confirmed: bool = False,
) -> list[object]:
    """The user information items of our A-ASSOCIATE-AC (PS3.7 D.3.3)."""
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    items: list[object] = [max_length, class_uid, version, *role_replies]
    if any(isinstance(i, AsynchronousOperationsWindowNegotiation) for i in requested):
        # PS3.7 D.3.3.3: we perform operations one at a time; say so with a 1/1 window.
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        items.append(window)
    if identity_confirmed:
        # PS3.7 D.3.3.7.2: the positive response the requestor asked for; for a username
        # (with or without passcode) its Server Response is zero length.
        identity = UserIdentityNegotiation()
        identity.server_response = b""
        items.append(identity)
    return items


def user_information_request(max_pdu: int, roles: dict[str, tuple[bool, bool]]) -> list[object]:
    """The user information items of an A-ASSOCIATE-RQ we send."""
    items = user_information_reply(max_pdu, (), ())
    for sop_class, (scu, scp) in roles.items():
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = sop_class
        role.scu_role = scu
        role.scp_role = scp
        items.append(role)
    return items


def build_requested_contexts(
    proposals: Sequence[tuple[str, Sequence[str]]],
) -> list[PresentationContext]:
    """Presentation contexts for an A-ASSOCIATE-RQ, with odd IDs 1, 3, 5... (PS3.8 9.3.2.2)."""
    if len(proposals) > 128:
        raise ValueError("at most 128 presentation contexts can be proposed")
    contexts = []
    for index, (abstract, transfer) in enumerate(proposals):
        context = PresentationContext()
        context.context_id = 2 * index + 1
        context.abstract_syntax = abstract
        context.transfer_syntax = list(transfer)
        contexts.append(context)
    return contexts


def accepted_as_requestor(
    proposed: Sequence[PresentationContext],
    results: Sequence[PresentationContext],
    roles: dict[str, tuple[bool, bool]],
) -> dict[int, AcceptedContext]:
    """The contexts an A-ASSOCIATE-AC accepted, from the requestor's side."""
    accepted = {}
    for context in negotiate_as_requestor(list(proposed), list(results), None):
        if context.result != 0:
            continue
        scu, scp = roles.get(str(context.abstract_syntax), (True, False))
        accepted[context.context_id] = AcceptedContext(
            context.context_id,
            str(context.abstract_syntax),
            str(context.transfer_syntax[0]),
            we_are_scp=scp,
            we_are_scu=scu,
        )
    return accepted
