"""C-FIND response identifiers (PS3.4 C.4.1.1.3.2): every requested key, in the right charset.

Each key of the request comes back: from the index row, from the stored header of the
entity, computed (counts, Modalities/SOP Classes in Study), or zero-length when the
entity has no value. Specific Character Set is present only when a value needs more than
the default repertoire: then the client's own character set if it can carry every value,
else UTF-8 (ISO_IR 192).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Any, Final

from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from minipacs import dataset as dicom
from minipacs.index.query import (
    INSTANCE_AVAILABILITY,
    QUERY_RETRIEVE_LEVEL,
    RETRIEVE_AE_TITLE,
    SPECIFIC_CHARACTER_SET,
    FindPlan,
    Match,
    Term,
)

UTF8: Final = "ISO_IR 192"
_TEXT_VRS: Final = frozenset({"SH", "LO", "ST", "LT", "UT", "PN", "UC"})
_NUMBER_VRS: Final = frozenset({"US", "UL", "SS", "SL", "FL", "FD", "SV", "UV"})


Element = tuple[int, str, Any]
_LONG_VRS: Final = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
)
# VRs whose values the direct encoder writes; anything else goes through pydicom.
_STRING_VRS: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI"}
    | {"UR", "UT"}
)
_NUMBER_FORMATS: Final = {"US": "H", "UL": "L", "SS": "h", "SL": "l", "FL": "f", "FD": "d"}
_EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
_IMPLICIT_LE: Final = "1.2.840.10008.1.2"


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


def _empty(term: Term) -> Element:
    return (term.tag, term.vr, DicomSequence() if term.vr == "SQ" else None)


def _from_header(term: Term, header: Dataset | None) -> Element:
    element = header.get(term.tag) if header is not None else None
    if element is None:
        return _empty(term)
    if element.VR == "SQ":
        items = element.value
        if term.item is not None:
            items = DicomSequence(_only(item, term.item) for item in items)
        return (term.tag, "SQ", items)
    value = element.value
    if isinstance(value, MultiValue | list):
        value = list(value)
    return (term.tag, element.VR, value)


def response_elements(plan: FindPlan, match: Match, ae_title: str) -> list[Element]:
    """(tag, VR, value) of every key of one response, QueryRetrieveLevel included."""
    elements: list[Element] = [(QUERY_RETRIEVE_LEVEL, "CS", plan.level)]
    for term in plan.terms:
        if not term.supported:
            elements.append(_empty(term))
        elif term.key.source == "header":
            elements.append(_from_header(term, match.header))
        else:
            elements.append((term.tag, term.vr, _value(term, match, ae_title)))
    elements.sort(key=lambda element: element[0])
    return elements


def _texts(elements: Iterable[Element]) -> Iterator[str]:
    for _tag, vr, value in elements:
        if vr == "SQ":
            for item in value:
                yield from _texts((e.tag, e.VR, e.value) for e in item)
        elif vr in _TEXT_VRS and value is not None:
            yield from (str(v) for v in (value if isinstance(value, list) else [value]))


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


def response_charset(elements: list[Element], requested: tuple[str, ...]) -> str | list[str] | None:
    """The Specific Character Set a response needs (None: default repertoire suffices)."""
    texts = [text for text in _texts(elements) if not text.isascii()]
    if not texts:
        return None
    if any(requested) and _can_carry(requested, texts):
        return list(requested) if len(requested) > 1 else requested[0]
    return UTF8


def _direct_codec(elements: list[Element], charset: str | list[str] | None) -> str | None:
    """The Python codec the direct encoder can use, or None when pydicom must encode."""
    if isinstance(charset, list) or any(
        vr not in _STRING_VRS and vr not in _NUMBER_FORMATS for _tag, vr, _v in elements
    ):
        return None
    if charset is None:
        return "ascii"
    if charset.startswith("ISO 2022"):
        return None
    return convert_encodings([charset])[0]


def _encode_value(vr: str, value: Any, codec: str) -> bytes:
    if value is None or value == "" or value == []:
        return b""
    values = value if isinstance(value, list) else [value]
    if vr in _NUMBER_FORMATS:
        return struct.pack(f"<{len(values)}{_NUMBER_FORMATS[vr]}", *values)
    raw = "\\".join(str(v) for v in values).encode(codec)
    if len(raw) % 2:
        # PS3.5 6.2: UI pads with NUL, every other string VR with a space.
        raw += b"\0" if vr == "UI" else b" "
    return raw


def _encode_direct(elements: list[Element], codec: str, explicit: bool) -> bytes:
    parts = []
    for tag, vr, value in elements:
        raw = _encode_value(vr, value, codec)
        group, element = tag >> 16, tag & 0xFFFF
        if not explicit:
            parts.append(struct.pack("<HHL", group, element, len(raw)))
        elif vr in _LONG_VRS:
            parts.append(struct.pack("<HH2sHL", group, element, vr.encode(), 0, len(raw)))
        else:
            parts.append(struct.pack("<HH2sH", group, element, vr.encode(), len(raw)))
        parts.append(raw)
    return b"".join(parts)


def encode_response(plan: FindPlan, match: Match, ae_title: str, transfer_syntax: str) -> bytes:
    """One Pending response's identifier for one matching entity, encoded."""
    elements = response_elements(plan, match, ae_title)
    charset = response_charset(elements, plan.charset)
    if charset is not None:
        elements.insert(0, (SPECIFIC_CHARACTER_SET, "CS", charset))
    codec = _direct_codec(elements, charset)
    if codec is not None and transfer_syntax in (_EXPLICIT_LE, _IMPLICIT_LE):
        # pydicom's writer costs ~70 us an element; these elements are plain values.
        return _encode_direct(elements, codec, transfer_syntax == _EXPLICIT_LE)
    dataset = Dataset()
    for tag, vr, value in elements:
        dataset.add(DataElement(tag, vr, value))
    return dicom.encode(dataset, transfer_syntax)
