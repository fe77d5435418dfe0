"""C-FIND response identifiers (PS3.4 C.4.1.1.3.2): every requested key, in the right charset.

Each key of the request comes back: from the index row, from the stored header of the
entity, computed (counts, Modalities/SOP Classes in Study), or zero-length when the
entity has no value. Specific Character Set is present only when a value needs more than
the default repertoire: then the client's own character set if it can carry every value,
else UTF-8 (ISO_IR 192).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence as DicomSequence

from minipacs.index.query import (
    INSTANCE_AVAILABILITY,
    RETRIEVE_AE_TITLE,
    FindPlan,
    Match,
    Term,
)

UTF8: Final = "ISO_IR 192"
_TEXT_VRS: Final = frozenset({"SH", "LO", "ST", "LT", "UT", "PN", "UC"})
_NUMBER_VRS: Final = frozenset({"US", "UL", "SS", "SL", "FL", "FD", "SV", "UV"})


def _value(term: Term, match: Match, ae_title: str) -> Any:
    source = term.key.source
    if source == "constant":
        if term.tag == RETRIEVE_AE_TITLE:
            return ae_title
        return "ONLINE" if term.tag == INSTANCE_AVAILABILITY else None
    if source == "sop_classes":
        return match.sop_classes or None
    value = match.values.get(term.tag)
    if value is None or value == "":
        return None
    if source == "modalities":
        return str(value).split("\\")
    if term.vr in _NUMBER_VRS:
        return int(value)
    return str(value)


def _only(item: Dataset, wanted: Dataset) -> Dataset:
    """An item cut down to the sub-keys a sequence key asked for (PS3.4 C.2.2.2.6)."""
    if len(wanted) == 0:
        return item
    cut = Dataset()
    for sub in wanted:
        element = item.get(sub.tag)
        if element is None:
            cut.add(DataElement(sub.tag, sub.VR, None if sub.VR != "SQ" else DicomSequence()))
        elif element.VR == "SQ" and sub.VR == "SQ" and sub.value:
            cut.add(
                DataElement(
                    sub.tag, "SQ", DicomSequence(_only(i, sub.value[0]) for i in element.value)
                )
            )
        else:
            cut.add(element)
    return cut


def _from_header(term: Term, header: Dataset | None) -> DataElement:
    element = header.get(term.tag) if header is not None else None
    if element is None:
        return DataElement(term.tag, term.vr, DicomSequence() if term.vr == "SQ" else None)
    if element.VR == "SQ" and term.item is not None:
        items = DicomSequence(_only(item, term.item) for item in element.value)
        return DataElement(term.tag, "SQ", items)
    return element


def _element(term: Term, match: Match, ae_title: str) -> DataElement:
    if not term.supported:
        return DataElement(term.tag, term.vr, DicomSequence() if term.vr == "SQ" else None)
    if term.key.source == "header":
        return _from_header(term, match.header)
    return DataElement(term.tag, term.vr, _value(term, match, ae_title))


def _texts(dataset: Dataset) -> Iterator[str]:
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                yield from _texts(item)
        elif element.VR in _TEXT_VRS and element.value is not None:
            values = element.value if isinstance(element.value, list) else [element.value]
            yield from (str(v) for v in values)


def _can_carry(charset: tuple[str, ...], texts: list[str]) -> bool:
    try:
        codecs = convert_encodings(list(charset))
    except (LookupError, ValueError):
        return False

    def encodable(char: str) -> bool:
        for codec in codecs:
            try:
                char.encode(codec)
            except (UnicodeEncodeError, LookupError):
                continue
            return True
        return False

    return all(encodable(char) for text in texts for char in set(text) if ord(char) > 0x7F)


def response_charset(dataset: Dataset, requested: tuple[str, ...]) -> str | list[str] | None:
    """The Specific Character Set a response needs (None: default repertoire suffices)."""
    texts = [text for text in _texts(dataset) if not text.isascii()]
    if not texts:
        return None
    if any(requested) and _can_carry(requested, texts):
        return list(requested) if len(requested) > 1 else requested[0]
    return UTF8


def response_identifier(plan: FindPlan, match: Match, ae_title: str) -> Dataset:
    """The identifier of one Pending response for one matching entity."""
    dataset = Dataset()
    dataset.QueryRetrieveLevel = plan.level
    for term in plan.terms:
        dataset.add(_element(term, match, ae_title))
    charset = response_charset(dataset, plan.charset)
    if charset is not None:
        dataset.SpecificCharacterSet = charset
    return dataset
