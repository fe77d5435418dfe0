"""The conformance statement in docs/ is what the code generates, and the code does it."""

from __future__ import annotations

import re
from pathlib import Path

from minipacs.net.commands import COMMAND_NAMES
from minipacs.net.negotiation import AcceptorPolicy
from minipacs.ops.conformance import conformance_statement
from minipacs.services import build_services

DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"


def test_document_matches_the_code() -> None:
    assert DOCUMENT.read_text(encoding="utf-8") == conformance_statement(), (
        "docs/conformance.md is stale: run `minipacs conformance -o docs/conformance.md`"
    )


def test_every_sop_class_in_the_document_is_accepted() -> None:
    accepted = {str(context.abstract_syntax) for context in AcceptorPolicy().contexts}
    listed = set(re.findall(r"\| (1\.2\.840\.10008\.[0-9.]+) \|", conformance_statement()))
    # Transfer syntaxes (1.2.840.10008.1.2...) and the application context (...3.1.1.1) aside.
    sop_classes = {
        uid for uid in listed if not uid.startswith(("1.2.840.10008.1.2", "1.2.840.10008.3."))
    }
    assert sop_classes and sop_classes <= accepted


class _Handler:
    """Stands in for a service object: build_services only takes its handle method."""

    async def handle(self, operation: object) -> None:
        """Never called."""


def test_every_dimse_service_in_the_document_has_a_handler() -> None:
    stand_in = _Handler()
    services = build_services(stand_in, stand_in, stand_in, stand_in)  # type: ignore[arg-type]
    served = {COMMAND_NAMES[field].removesuffix("-RQ") for field in services}
    named = set(re.findall(r"\| (C-[A-Z]+) \|\n", conformance_statement()))
    assert named and named <= served
