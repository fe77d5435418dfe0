"""Query/Retrieve GET as SCP: C-GET (PS3.4 C.4.3, PS3.7 9.1.3).

The C-STORE sub-operations go over the requestor's own association (PS3.4 C.4.3.3.1),
on the storage contexts for which it took the SCP role through SCP/SCU Role Selection
(PS3.7 D.3.3.4); an instance whose SOP class and transfer syntax no such context carries
counts as a failed sub-operation.
"""

from __future__ import annotations

from collections.abc import Mapping

from minipacs.index.keys import GET_MODELS
from minipacs.net.operations import Operation
from minipacs.services.retrieve import RetrieveService
from minipacs.services.suboperations import Target


class GetService(RetrieveService):
    """Answers C-GET-RQ on the Patient Root and Study Root GET models."""

    name = "C-GET"
    models = GET_MODELS

    async def open_target(
        self, operation: Operation, summary: Mapping[tuple[str, str], int]
    ) -> Target:
        """The requestor's association, with the contexts it lets us send C-STORE on."""
        session = operation.session
        contexts = list(session.association.contexts.values())
        return Target(session, contexts, self.options.response_timeout)
