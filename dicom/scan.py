"""A fast walk over a received data set's top level: the attributes the intake checks before storing it.

The intake must know, for every C-STORE, the study, series and instance UIDs
(they form the spool path) and the pixel description (to refuse a truncated
or absurd image before it is acknowledged).  Decoding the data set with
pydicom for that builds an element object for each of its ~100 attributes,
on every C-STORE.  :func:`scan_instance` walks the same bytes with ``struct`` and
keeps only what it was asked for; nested sequences and encapsulated pixel
data are stepped over by their lengths or delimiters, never decoded.
``tests/test_scan.py`` checks it against pydicom on every transfer syntax
the node accepts, and on what pydicom tolerates from real encoders (stray
delimiters, Explicit VR inside an undefined-length UN, an Implicit VR data
set sent as Explicit, "1.0" as Number of Frames).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from pydicom.charset import convert_encodings, decode_bytes, python_encoding

#: The one transfer syntax that is big endian (Implicit VR is told from the data set's first element).
_EXPLICIT_BIG = "1.2.840.10008.1.2.2"

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD

#: Input fed to the inflater at a time.
_INFLATE_SLICE = 1 << 20

#: Deepest nesting of sequences stepped over; deeper is refused (a crafted data set cannot recurse forever).
_MAX_DEPTH = 64

# Tags the intake reads.
SPECIFIC_CHARACTER_SET = 0x00080005
SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
MODALITY = 0x00080060
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
IMAGE_POSITION_PATIENT = 0x00200032
IMAGE_ORIENTATION_PATIENT = 0x00200037
SAMPLES_PER_PIXEL = 0x00280002
NUMBER_OF_FRAMES = 0x00280008
ROWS = 0x00280010
COLUMNS = 0x00280011
PIXEL_SPACING = 0x00280030
BITS_ALLOCATED = 0x00280100
BITS_STORED = 0x00280101
HIGH_BIT = 0x00280102
PIXEL_DATA = 0x7FE00010
# Tags the node's study manifest keeps (series choice, routing, instruction sources): read in the same walk.
IMAGE_TYPE = 0x00080008
SERIES_NUMBER = 0x00200011
FRAME_OF_REFERENCE_UID = 0x00200052
REQUEST_ATTRIBUTES_SEQUENCE = 0x00400275
#: Read at the top level (a text attribute) and inside the Request Attributes Sequence's items.
REQUESTED_PROCEDURE_DESCRIPTION = 0x00321060
#: Items of a Request Attributes Sequence walked for it; a sequence with more is left to pydicom.
MAX_REQUEST_ITEMS = 64
SHARED_FUNCTIONAL_GROUPS_SEQUENCE = 0x52009229
#: Found, but their values are not copied (pixels; sequences, whose items are walked in place).
_NOT_COPIED = frozenset({PIXEL_DATA, REQUEST_ATTRIBUTES_SEQUENCE, SHARED_FUNCTIONAL_GROUPS_SEQUENCE})
#: Text attributes kept by keyword, decoded in the instance's Specific Character Set.
TEXT_ATTRIBUTES = {
    0x00080050: "AccessionNumber",
    0x00081030: "StudyDescription",
    0x0008103E: "SeriesDescription",
    0x00100010: "PatientName",
    0x00100020: "PatientID",
    0x00180010: "ContrastBolusAgent",
    0x00180024: "SequenceName",
    0x00181030: "ProtocolName",
    REQUESTED_PROCEDURE_DESCRIPTION: "RequestedProcedureDescription",
}


class DataSetScanError(ValueError):
    """The bytes are not a well-formed data set in the transfer syntax they were sent in."""


@dataclass(frozen=True)
class ScannedElement:
    """A top-level element found by :func:`scan`.

    Attributes
    ----------
    length : int or None
        The value length; ``None`` for an undefined length (a sequence, or
        encapsulated pixel data).
    value : bytes
        The value as encoded (empty for Pixel Data, sequences and undefined lengths: not kept).
    offset : int
        Where the value starts in the data set (a sequence's items are read from there).
    vr : str or None
        The explicit VR (``None`` in Implicit VR).
    """

    length: int | None
    value: bytes
    offset: int = 0
    vr: str | None = None


def inflate(data: bytes | bytearray, limit: int) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian data set (raw deflate, PS3.5 A.5).

    Raises
    ------
    DataSetScanError
        When the stream is corrupt, ends early, has bytes after its end, or
        would inflate to more than ``limit`` bytes (a deflate bomb is cut off
        there, not allocated).
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    source = memoryview(data)
    parts: list[bytes] = []
    size = consumed = 0
    try:
        # Fed in slices, so that neither the input (which may be a memory map) nor a bomb's output is
        # copied whole: at most ``limit`` bytes of output and one slice of input are ever held.
        while consumed < len(source) and not inflater.eof:
            piece = source[consumed : consumed + _INFLATE_SLICE]
            consumed += len(piece)
            parts.append(inflater.decompress(piece, limit - size + 1))
            size += len(parts[-1])
            if size > limit:
                raise DataSetScanError(f"deflated data inflates beyond {limit} bytes")
    except zlib.error as exc:
        raise DataSetScanError(f"deflated data set does not inflate ({exc})") from exc
    finally:
        source.release()
    if not inflater.eof:
        raise DataSetScanError("deflated data set ends before its deflate stream does")
    trailing = len(inflater.unused_data) + len(data) - consumed
    if trailing > 1 or inflater.unused_data.strip(b"\x00"):  # one NUL pad byte to even length is allowed
        raise DataSetScanError(f"{trailing} bytes after the end of the deflate stream")
    return b"".join(parts)


#: Explicit VRs (PS3.5 Table 6.2-1): how an explicit element header is told from an implicit one.
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


def _looks_implicit(view: memoryview) -> bool:
    """Whether a little-endian data set's first element has no VR (as pydicom tells, for mislabelled senders)."""
    return len(view) >= 8 and bytes(view[4:6]) not in _VRS


class _Walker:
    """Steps through elements of one encoding; collects wanted top-level ones."""

    def __init__(self, view: memoryview, implicit: bool, little: bool) -> None:
        self.view = view
        self.implicit = implicit
        self.order = "<" if little else ">"
        self.tag_length = struct.Struct(self.order + "HHL")  # implicit element header; also item headers
        self.tag_vr_short = struct.Struct(self.order + "HH2sH")
        self.long_length = struct.Struct(self.order + "L")

    def top_level(self, wanted: Collection[int]) -> dict[int, ScannedElement]:
        found: dict[int, ScannedElement] = {}
        offset, end = 0, len(self.view)
        while offset < end:
            tag, vr, length, offset = self._header(offset, end)
            if tag in (_SEQUENCE_DELIMITER, _ITEM_DELIMITER) and length == 0:
                continue  # a stray delimiter some encoders leave behind (pydicom skips it too)
            if tag >> 16 == 0xFFFE:
                raise DataSetScanError(f"item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) at the top level")
            if length == _UNDEFINED:
                if tag in wanted:
                    found[tag] = ScannedElement(None, b"", offset, vr)
                offset = self._skip_undefined(offset, vr, 1)
                continue
            if length > end - offset:
                raise DataSetScanError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) claims {length} bytes, "
                                       f"{end - offset} are left")  # fmt: skip
            if tag in wanted:
                value = b"" if tag in _NOT_COPIED or vr == "SQ" else bytes(self.view[offset : offset + length])
                found[tag] = ScannedElement(length, value, offset, vr)
            offset += length
        return found

    def item_data_sets(self, element: ScannedElement, limit: int) -> Iterator[memoryview]:
        """The data set of each item of a sequence :meth:`top_level` found, lazily, at most ``limit`` of them.

        An item may not reach beyond its sequence's defined length; more than
        ``limit`` items raise (a crafted sequence of a million empty items costs
        no more than ``limit``).
        """
        offset = element.offset
        end = len(self.view) if element.length is None else element.offset + element.length
        for _ in range(limit + 1):
            if offset >= end:
                return
            if end - offset < 8:
                raise DataSetScanError("sequence ends inside an item header")
            group, number, length = self.tag_length.unpack_from(self.view, offset)
            tag, offset = group << 16 | number, offset + 8
            if tag == _SEQUENCE_DELIMITER:
                return
            if tag != _ITEM:
                raise DataSetScanError(f"({group:04X},{number:04X}) where an item was expected")
            if length == _UNDEFINED:
                after = self._skip_item_data_set(offset, 1, end)
                yield self.view[offset : after - 8]  # up to its item delimiter
                offset = after
            elif length > end - offset:
                raise DataSetScanError(f"item claims {length} bytes, {end - offset} are left")
            else:
                yield self.view[offset : offset + length]
                offset += length
        raise DataSetScanError(f"sequence has more than {limit} items")

    def _header(self, offset: int, end: int) -> tuple[int, str | None, int, int]:
        """Decode an element header at ``offset``: tag, VR, value length, offset of the value."""
        if end - offset < 8:
            raise DataSetScanError(f"data set ends inside an element header at byte {offset}")
        if self.implicit:
            group, element, length = self.tag_length.unpack_from(self.view, offset)
            return group << 16 | element, None, length, offset + 8
        group, element, vr, length = self.tag_vr_short.unpack_from(self.view, offset)
        if group == 0xFFFE:  # item and delimiter tags carry no VR, even in Explicit VR
            (length,) = self.long_length.unpack_from(self.view, offset + 4)
            return group << 16 | element, None, length, offset + 8
        if vr in _LONG_VRS:
            if end - offset < 12:
                raise DataSetScanError(f"data set ends inside an element header at byte {offset}")
            (length,) = self.long_length.unpack_from(self.view, offset + 8)
            return group << 16 | element, vr.decode("ascii"), length, offset + 12
        if not (vr.isalpha() and vr.isupper()):
            raise DataSetScanError(f"element ({group:04X},{element:04X}) has no valid VR ({vr!r})")
        return group << 16 | element, vr.decode("ascii"), length, offset + 8

    def _skip_undefined(self, offset: int, vr: str | None, depth: int) -> int:
        """Step over the items of an undefined-length value up to its sequence delimiter; offset after it."""
        if depth > _MAX_DEPTH:
            raise DataSetScanError(f"sequences nested deeper than {_MAX_DEPTH}")
        if vr == "UN" and not self.implicit:
            # An undefined-length UN is a sequence encoded in Implicit VR Little Endian (PS3.5 6.2.2);
            # some encoders keep Explicit VR inside it, which pydicom reads too.
            try:
                return _Walker(self.view, True, True)._skip_undefined(offset, None, depth)
            except DataSetScanError:
                return self._skip_undefined(offset, None, depth)
        end = len(self.view)
        while True:
            if end - offset < 8:
                raise DataSetScanError("data set ends inside an undefined-length value")
            group, element, length = self.tag_length.unpack_from(self.view, offset)
            tag = group << 16 | element
            offset += 8
            if tag == _SEQUENCE_DELIMITER:
                return offset
            if tag != _ITEM:
                raise DataSetScanError(f"({group:04X},{element:04X}) where an item was expected")
            if length == _UNDEFINED:
                offset = self._skip_item_data_set(offset, depth)
            elif length > end - offset:
                raise DataSetScanError(f"item claims {length} bytes, {end - offset} are left")
            else:
                offset += length

    def _skip_item_data_set(self, offset: int, depth: int, end: int | None = None) -> int:
        """Step over the elements of an undefined-length item up to its item delimiter; offset after it.

        ``end``: where the enclosing value ends (the data set's end by default); the item may not pass it.
        """
        end = len(self.view) if end is None else end
        while True:
            tag, vr, length, offset = self._header(offset, end)
            if tag == _ITEM_DELIMITER:
                return offset
            if length == _UNDEFINED:
                offset = self._skip_undefined(offset, vr, depth + 1)
                if offset > end:
                    raise DataSetScanError("a sequence inside an item runs past the end of its enclosing value")
            elif length > end - offset:
                raise DataSetScanError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end")
            else:
                offset += length


def scan(data: bytes | bytearray, transfer_syntax: str, wanted: Collection[int]) -> dict[int, ScannedElement]:
    """Find ``wanted`` top-level elements of a data set encoded in ``transfer_syntax``.

    Parameters
    ----------
    data : bytes-like
        The data set (for Deflated Explicit VR Little Endian: already inflated, see :func:`inflate`).
    transfer_syntax : str
        Its transfer syntax UID.  Explicit VR Big Endian is read big endian;
        every other syntax is little endian, Implicit or Explicit VR as the
        first element shows (Implicit VR Little Endian has no VR there;
        compressed syntaxes use Explicit VR Little Endian for the data set).
    wanted : collection of int
        Tags as ``0xGGGGEEEE``.

    Returns
    -------
    dict
        Tag to :class:`ScannedElement` for each wanted tag present.

    Raises
    ------
    DataSetScanError
        When an element header or value runs past the end, an explicit VR is
        not two upper-case letters, or a sequence is malformed or nested too deep.
    """
    return _walker(data, transfer_syntax).top_level(frozenset(wanted))


def _walker(data: bytes | bytearray, transfer_syntax: str) -> _Walker:
    view = memoryview(data)
    little = transfer_syntax != _EXPLICIT_BIG
    # The transfer syntax says; a little-endian data set whose first element says otherwise is read as it is
    # encoded (pydicom does the same), so a mislabelling sender is not refused for what pydicom reads.
    implicit = _looks_implicit(view) if little else False
    return _Walker(view, implicit, little)


def _requested_procedure(
    walker: _Walker, sequence: ScannedElement | None, charset: tuple[str, ...] | None
) -> str | None:
    """The first Requested Procedure Description in a Request Attributes Sequence's items ("" if none has one).

    ``None`` when the sequence is absent, or its items cannot be walked or are more
    than :data:`MAX_REQUEST_ITEMS`: the tags source then reads the file with pydicom.
    A sequence sent as UN holds Implicit VR items (PS3.5 6.2.2); Explicit VR ones,
    which some encoders leave there, are tried next, as pydicom does.
    """
    if sequence is None:
        return None
    walkers = [walker]
    if sequence.vr == "UN" and not walker.implicit:
        walkers.insert(0, _Walker(walker.view, True, True))
    for items_walker in walkers:
        try:
            return _first_procedure(items_walker, sequence, charset)
        except DataSetScanError:
            continue
    return None


def _first_procedure(walker: _Walker, sequence: ScannedElement, charset: tuple[str, ...] | None) -> str:
    for item in walker.item_data_sets(sequence, MAX_REQUEST_ITEMS):
        inner = _Walker(item, walker.implicit, walker.order == "<").top_level({REQUESTED_PROCEDURE_DESCRIPTION})
        element = inner.get(REQUESTED_PROCEDURE_DESCRIPTION)
        text = _decoded(element.value, charset).strip() if element is not None else ""
        if text:
            return text
    return ""


@dataclass(frozen=True)
class InstanceFacts:
    """What the intake checks about a received instance (values as on the wire, ``None`` when absent).

    ``pixel_data_length`` is ``None`` without Pixel Data and -1 for
    encapsulated (undefined-length) Pixel Data.  Multi-valued text comes as
    a tuple of its values (Specific Character Set keeps an empty first value,
    which means the default repertoire); decimal strings as floats, parsed
    with Python's ``float`` so that "NaN" or "1e999" reach the checks as the
    non-finite numbers they claim to be.  Only top-level elements are read:
    the per-frame geometry of an enhanced multi-frame image is not here.
    """

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    rows: int | None
    columns: int | None
    number_of_frames: int | None
    samples_per_pixel: int | None
    bits_allocated: int | None
    pixel_data_length: int | None
    modality: str | None = None
    specific_character_set: tuple[str, ...] | None = None
    bits_stored: int | None = None
    high_bit: int | None = None
    image_position: tuple[float, ...] | None = None
    image_orientation: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, ...] | None = None
    frame_of_reference_uid: str | None = None
    series_number: int | None = None
    image_type: tuple[str, ...] | None = None
    #: Shared Functional Groups present: an enhanced multi-frame image keeps its geometry there.
    has_functional_groups: bool = False
    #: A Request Attributes Sequence the scan could not read into: the tags source parses the file for it.
    has_request_attributes: bool = False
    #: The first Requested Procedure Description inside the Request Attributes Sequence, when one is there.
    request_attributes_procedure: str | None = None
    #: ``(keyword, text)`` of the :data:`TEXT_ATTRIBUTES` present and not blank.
    text_attributes: tuple[tuple[str, str], ...] = ()


def _decoded(value: bytes, character_set: tuple[str, ...] | None) -> str:
    """A text value decoded as pydicom decodes it (person names keep their ``^`` and ``=``).

    A term pydicom does not know exactly is read as ASCII here, without pydicom's warning per
    instance: the job names an unknown character set when it reads the series.
    """
    terms = [t for t in character_set or () if t] or ["ISO_IR 6"]
    if not all(t in python_encoding for t in terms):
        return value.decode("ascii", "replace")
    try:
        return decode_bytes(value, convert_encodings(terms), {0x5C, 0x3D, 0x5E})
    except (LookupError, ValueError):
        return value.decode("ascii", "replace")


def _integer_string(value: str | None) -> int | None:
    """An IS value (the first of several); ``"1.0"`` is read as 1, as pydicom does."""
    if value is None or not value.strip():
        return None
    first = value.split("\\")[0].strip()
    try:
        return int(first)
    except ValueError:
        pass
    try:
        number = float(first)
    except ValueError:
        number = float("nan")
    if number.is_integer():
        return int(number)
    raise DataSetScanError(f"Number of Frames {value!r} is not an integer")


def _decimal_strings(value: str | None, name: str) -> tuple[float, ...] | None:
    """A DS value as floats; ``None`` when absent or empty."""
    if value is None or not value.strip():
        return None
    try:
        return tuple(float(part) for part in value.split("\\"))
    except ValueError:
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise DataSetScanError(f"{name} '{shown}' is not a decimal string") from None


def _code_strings(value: str | None) -> tuple[str, ...] | None:
    """A CS value as its stripped values; ``None`` when absent or empty."""
    if value is None or not value.strip():
        return None
    return tuple(part.strip() for part in value.split("\\"))


_WANTED = frozenset((SPECIFIC_CHARACTER_SET, SOP_CLASS_UID, SOP_INSTANCE_UID, MODALITY, STUDY_INSTANCE_UID,
           SERIES_INSTANCE_UID, IMAGE_POSITION_PATIENT, IMAGE_ORIENTATION_PATIENT, SAMPLES_PER_PIXEL,
           NUMBER_OF_FRAMES, ROWS, COLUMNS, PIXEL_SPACING, BITS_ALLOCATED, BITS_STORED, HIGH_BIT,
           PIXEL_DATA, IMAGE_TYPE, SERIES_NUMBER, FRAME_OF_REFERENCE_UID, REQUEST_ATTRIBUTES_SEQUENCE,
           SHARED_FUNCTIONAL_GROUPS_SEQUENCE, *TEXT_ATTRIBUTES))  # fmt: skip


def scan_instance(data: bytes | bytearray, transfer_syntax: str) -> InstanceFacts:
    """The identifying UIDs, modality, pixel description and geometry of a data set, without decoding it.

    Parameters
    ----------
    data : bytes-like
        The data set as received (Deflated syntaxes: already inflated).
    transfer_syntax : str
        Its transfer syntax UID.

    Raises
    ------
    DataSetScanError
        When the data set is malformed (see :func:`scan`) or a pixel
        description value does not decode (a US that is not 2 bytes, a
        Number of Frames that is not an integer string, an Image Position,
        Image Orientation or Pixel Spacing that is not a decimal string).
    """
    walker = _walker(data, transfer_syntax)
    found = walker.top_level(_WANTED)
    order = walker.order

    def text(tag: int) -> str | None:
        element = found.get(tag)
        return element.value.rstrip(b"\x00 ").decode("ascii", "replace") if element is not None else None

    def us(tag: int) -> int | None:
        element = found.get(tag)
        if element is None or element.length == 0:
            return None
        if element.length is None or element.length % 2:
            raise DataSetScanError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is not an unsigned short")
        return struct.unpack_from(order + "H", element.value)[0]

    frames = _integer_string(text(NUMBER_OF_FRAMES))
    pixel = found.get(PIXEL_DATA)
    character_set = _code_strings(text(SPECIFIC_CHARACTER_SET))
    texts = ((keyword, _decoded(found[tag].value, character_set).strip()) for tag, keyword in TEXT_ATTRIBUTES.items()
             if tag in found)  # fmt: skip
    requested = _requested_procedure(walker, found.get(REQUEST_ATTRIBUTES_SEQUENCE), character_set)
    try:
        series_number = _integer_string(text(SERIES_NUMBER))
    except DataSetScanError:  # not a number: as if absent (the intake does not refuse it)
        series_number = None
    return InstanceFacts(
        sop_class_uid=text(SOP_CLASS_UID),
        sop_instance_uid=text(SOP_INSTANCE_UID),
        study_instance_uid=text(STUDY_INSTANCE_UID),
        series_instance_uid=text(SERIES_INSTANCE_UID),
        rows=us(ROWS),
        columns=us(COLUMNS),
        number_of_frames=frames,
        samples_per_pixel=us(SAMPLES_PER_PIXEL),
        bits_allocated=us(BITS_ALLOCATED),
        pixel_data_length=None if pixel is None else (-1 if pixel.length is None else pixel.length),
        modality=(text(MODALITY) or "").strip() or None,
        specific_character_set=character_set,
        bits_stored=us(BITS_STORED),
        high_bit=us(HIGH_BIT),
        image_position=_decimal_strings(text(IMAGE_POSITION_PATIENT), "Image Position (Patient)"),
        image_orientation=_decimal_strings(text(IMAGE_ORIENTATION_PATIENT), "Image Orientation (Patient)"),
        pixel_spacing=_decimal_strings(text(PIXEL_SPACING), "Pixel Spacing"),
        frame_of_reference_uid=text(FRAME_OF_REFERENCE_UID) or None,
        series_number=series_number,
        image_type=_code_strings(text(IMAGE_TYPE)),
        has_functional_groups=SHARED_FUNCTIONAL_GROUPS_SEQUENCE in found,
        has_request_attributes=REQUEST_ATTRIBUTES_SEQUENCE in found and requested is None,
        request_attributes_procedure=requested or None,
        text_attributes=tuple((keyword, value) for keyword, value in texts if value),
    )
