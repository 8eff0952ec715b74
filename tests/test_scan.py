"""The intake's data set scanner agrees with pydicom and refuses malformed bytes with one error type.

:func:`medsegagent.dicom.scan.scan_instance` replaces a pydicom decode on the
hot path of every C-STORE, so it is checked against pydicom on each transfer
syntax the node accepts, on multi-frame images with nested functional group
sequences, on SR documents (deeply nested, undefined lengths), and on
undefined-length UN; and fed truncated and corrupted data sets.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import zlib

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom.dsutils import encode

from medsegagent.dicom.scan import DataSetScanError, inflate, scan, scan_instance


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    from medsegagent.dicom.image_writer import write_phantom
    from medsegagent.dicom.phantom import make_phantom

    out = tmp_path_factory.mktemp("scan")
    single = write_phantom(make_phantom("CT", seed=5, slices=3, size=24), out / "single")
    multi = write_phantom(make_phantom("MR", seed=5, slices=3, size=24), out / "multi", multiframe=True)
    return single.series["CT"][0], multi.series["MR"][0]


def _encoded(ds: Dataset, syntax: str) -> bytes:
    """The data set as a C-STORE would carry it in ``syntax``."""
    if syntax == RLELossless:
        ds = ds.copy()
        ds.compress(RLELossless)
        return encode(ds, False, True)
    if syntax == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return deflater.compress(encode(ds, False, True)) + deflater.flush()
    return encode(ds, syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian)


def _facts_from_pydicom(ds: Dataset, encapsulated: bool) -> dict:
    return {
        "sop_class_uid": ds.get("SOPClassUID"),
        "sop_instance_uid": ds.get("SOPInstanceUID"),
        "study_instance_uid": ds.get("StudyInstanceUID"),
        "series_instance_uid": ds.get("SeriesInstanceUID"),
        "rows": ds.get("Rows"),
        "columns": ds.get("Columns"),
        "number_of_frames": int(ds.NumberOfFrames) if "NumberOfFrames" in ds else None,
        "samples_per_pixel": ds.get("SamplesPerPixel"),
        "bits_allocated": ds.get("BitsAllocated"),
        "pixel_data_length": None if "PixelData" not in ds else -1 if encapsulated else len(ds.PixelData),
        "modality": ds.get("Modality"),
        "bits_stored": ds.get("BitsStored"),
        "high_bit": ds.get("HighBit"),
        **{
            name: tuple(float(v) for v in ds[keyword].value) if keyword in ds else None
            for name, keyword in (
                ("image_position", "ImagePositionPatient"),
                ("image_orientation", "ImageOrientationPatient"),
                ("pixel_spacing", "PixelSpacing"),
            )
        },
    }


SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
            RLELossless]  # fmt: skip


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("which", ["single-frame CT", "multi-frame MR"])
def test_scan_matches_pydicom_on_every_accepted_syntax(phantom_files, syntax, which):
    """Same UIDs, pixel description and pixel data length as pydicom reads from the same bytes."""
    source = pydicom.dcmread(phantom_files[0 if which == "single-frame CT" else 1])
    data = _encoded(source, syntax)
    plain = inflate(data, 1 << 30) if syntax == DeflatedExplicitVRLittleEndian else data
    facts = scan_instance(plain, syntax)
    reference = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_part10(data, syntax)), force=True)
    expected = _facts_from_pydicom(reference, encapsulated=syntax == RLELossless)
    assert {k: getattr(facts, k) for k in expected} == expected
    if which == "multi-frame MR":
        assert facts.number_of_frames == 3  # the nested functional groups were stepped over, not mistaken


def _part10(data: bytes, syntax: str) -> bytes:
    """A Part 10 file around ``data`` so that pydicom reads it with the right transfer syntax."""
    from medsegagent.dicom.part10 import file_meta_header

    return file_meta_header(sop_class_uid="1.2.3", sop_instance_uid="1.2.3.4", transfer_syntax_uid=syntax,
                            implementation_class_uid="1.2.3") + data  # fmt: skip


def _nest(node: Dataset, depth: int, *, all_undefined: bool = False) -> None:
    """Nest ``depth`` content items below ``node``; every other level (or every level) with undefined lengths."""
    for level in range(depth):
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.TextValue = f"segment the liver, level {level}"
        undefined = all_undefined or level % 2 == 0
        item.is_undefined_length_sequence_item = undefined
        node.ContentSequence = Sequence([item])
        node["ContentSequence"].is_undefined_length = undefined
        node = item


def _sr_document() -> Dataset:
    """An SR document with content nested five deep, with defined and undefined lengths."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    _nest(ds, 5)
    return ds


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_sr_with_nested_undefined_length_sequences(syntax):
    """Nested sequences are stepped over: the UIDs after them are still found, and no pixel data is reported."""
    data = _encoded(_sr_document(), syntax)
    assert b"\xff\xff\xff\xff" in data  # undefined lengths are really on the wire
    facts = scan_instance(data, syntax)
    assert (facts.sop_instance_uid, facts.study_instance_uid, facts.series_instance_uid) == ("1.2.3.4.5", "1.2.3",
                                                                                            "1.2.3.4")  # fmt: skip
    assert facts.pixel_data_length is None


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """An Explicit VR Little Endian element with a short length field."""
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def test_undefined_length_un_is_stepped_over_as_implicit_vr():
    """An undefined-length UN holds an Implicit VR sequence (PS3.5 6.2.2): it must not derail the walk."""
    implicit_item = struct.pack("<HHL", 0x0008, 0x0100, 4) + b"T-62"  # an implicit element inside the item
    un = (struct.pack("<HH2sHL", 0x0009, 0x1010, b"UN", 0, 0xFFFFFFFF)
          + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + implicit_item
          + struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))  # fmt: skip
    data = _element(0x0008, 0x0018, b"UI", b"1.2.3.4\x00") + un + _element(0x0020, 0x000D, b"UI", b"1.2.3\x00")
    found = scan(data, ExplicitVRLittleEndian, [0x00080018, 0x0020000D, 0x00091010])
    assert found[0x0020000D].value == b"1.2.3\x00"
    assert found[0x00091010].length is None


def test_truncations_and_corruptions_raise_only_the_scan_error(phantom_files):
    """Any prefix and any byte flips give a result or DataSetScanError, never another exception."""
    rng = random.Random(7)
    for path in phantom_files:
        for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless):
            data = _encoded(pydicom.dcmread(path), syntax)
            for cut in rng.sample(range(1, len(data)), 80):
                with contextlib.suppress(DataSetScanError):
                    scan_instance(data[:cut], syntax)
            for _ in range(200):
                corrupt = bytearray(data)
                for _ in range(rng.randint(1, 6)):
                    corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
                with contextlib.suppress(DataSetScanError):
                    scan_instance(bytes(corrupt), syntax)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless])
def test_a_data_set_cut_inside_its_pixel_data_is_refused(phantom_files, syntax):
    """A transfer that stops inside the (last) Pixel Data element is malformed, native or encapsulated."""
    data = _encoded(pydicom.dcmread(phantom_files[0]), syntax)
    for cut in (len(data) - 1, len(data) - 100):
        with pytest.raises(DataSetScanError):
            scan_instance(data[:cut], syntax)


def test_deflate_bomb_is_refused():
    """A deflated data set that inflates beyond the limit is refused before it fills memory."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = bomb.compress(bytes(10 << 20)) + bomb.flush()
    with pytest.raises(DataSetScanError, match="beyond"):
        inflate(data, 1 << 20)
    with pytest.raises(DataSetScanError, match="does not inflate"):
        inflate(b"\xff" * 64, 1 << 20)


def test_deep_nesting_is_refused():
    """Sequences nested beyond the limit are refused instead of recursing without bound."""
    ds = Dataset()
    _nest(ds, 80, all_undefined=True)  # a defined length is skipped whole; only undefined ones are descended
    with pytest.raises(DataSetScanError, match="deeper"):
        scan(encode(ds, True, True), ImplicitVRLittleEndian, [])


def test_bad_pixel_description_values_are_scan_errors():
    """A Rows value of odd length or a non-numeric Number of Frames is a DataSetScanError, not a crash."""
    rows = _element(0x0028, 0x0010, b"US", b"\x01\x02\x03")
    with pytest.raises(DataSetScanError, match="unsigned short"):
        scan_instance(rows, ExplicitVRLittleEndian)
    frames = _element(0x0028, 0x0008, b"IS", b"ab")
    with pytest.raises(DataSetScanError, match="Number of Frames"):
        scan_instance(frames, ExplicitVRLittleEndian)


def test_truncated_or_padded_deflate_streams():
    """A deflate stream cut short, or followed by garbage, is refused; one NUL pad byte is allowed."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = deflater.compress(os.urandom(5000)) + deflater.flush()
    assert len(inflate(stream + b"\x00", 1 << 20)) == 5000
    with pytest.raises(DataSetScanError, match="ends before"):
        inflate(stream[: len(stream) // 2], 1 << 20)
    with pytest.raises(DataSetScanError, match="after the end"):
        inflate(stream + b"garbage", 1 << 20)


# -- what real encoders send and pydicom reads: the scanner must not refuse it ----------------------------


def _pydicom_reads(data: bytes, syntax: str) -> Dataset:
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(_part10(data, syntax)), force=True)


def _uid_elements() -> bytes:
    return _element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\x00") + _element(
        0x0008, 0x0018, b"UI", b"1.2.3.4\x00"
    )


def test_stray_sequence_delimiter_at_the_top_level_is_skipped():
    """A stray (FFFE,E0DD) between top-level elements (pydicom skips it) does not refuse the instance."""
    data = _uid_elements() + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0) + _element(0x0020, 0x000D, b"UI", b"1.2.3\x00")
    facts = scan_instance(data, ExplicitVRLittleEndian)
    reference = _pydicom_reads(data, ExplicitVRLittleEndian)
    assert (facts.sop_instance_uid, facts.study_instance_uid) == (reference.SOPInstanceUID, reference.StudyInstanceUID)


def test_explicit_vr_inside_an_undefined_length_un_is_stepped_over():
    """Some encoders keep Explicit VR inside an undefined-length UN; the walk falls back to it."""
    item = _element(0x0008, 0x0100, b"SH", b"T-62") + _element(0x0008, 0x0102, b"SH", b"SRT ")
    un = (struct.pack("<HH2sHL", 0x0009, 0x1010, b"UN", 0, 0xFFFFFFFF)
          + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + item
          + struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))  # fmt: skip
    data = _uid_elements() + un + _element(0x0020, 0x000D, b"UI", b"1.2.3\x00")
    assert scan_instance(data, ExplicitVRLittleEndian).study_instance_uid == "1.2.3"
    assert _pydicom_reads(data, ExplicitVRLittleEndian).StudyInstanceUID == "1.2.3"


def test_implicit_vr_data_set_sent_as_explicit_is_read_as_implicit(phantom_files):
    """A sender that labels an Implicit VR data set Explicit: read as encoded, as pydicom does."""
    ds = pydicom.dcmread(phantom_files[0])
    data = encode(ds, True, True)
    facts = scan_instance(data, ExplicitVRLittleEndian)
    assert (facts.sop_instance_uid, facts.rows, facts.pixel_data_length) == (ds.SOPInstanceUID, ds.Rows,
                                                                             len(ds.PixelData))  # fmt: skip


def test_number_of_frames_written_as_a_decimal():
    """'1.0' as Number of Frames is 1 (pydicom reads it so); '1.5' is refused."""
    assert scan_instance(_element(0x0028, 0x0008, b"IS", b"1.0 "), ExplicitVRLittleEndian).number_of_frames == 1
    with pytest.raises(DataSetScanError, match="Number of Frames"):
        scan_instance(_element(0x0028, 0x0008, b"IS", b"1.5 "), ExplicitVRLittleEndian)


def test_geometry_character_set_and_modality_are_read_as_sent():
    """Decimal strings become floats ("NaN" and "1e999" too: the checks refuse them), code strings tuples."""
    data = b"".join([
        _element(0x0008, 0x0005, b"CS", b"\\ISO 2022 IR 100 "),
        _element(0x0008, 0x0060, b"CS", b"CT"),
        _element(0x0020, 0x0032, b"DS", b"-1.5\\NaN\\1e999 "),
        _element(0x0028, 0x0030, b"DS", b"0\\.5 "),
    ])  # fmt: skip
    facts = scan_instance(data, ExplicitVRLittleEndian)
    assert facts.specific_character_set == ("", "ISO 2022 IR 100")
    assert facts.modality == "CT"
    assert facts.image_position[0] == -1.5 and facts.image_position[2] == float("inf")
    assert facts.image_position[1] != facts.image_position[1]  # NaN
    assert facts.pixel_spacing == (0.0, 0.5)
    assert facts.image_orientation is None and facts.bits_stored is None
    with pytest.raises(DataSetScanError, match="Pixel Spacing 'one' is not a decimal string"):
        scan_instance(_element(0x0028, 0x0030, b"DS", b"one "), ExplicitVRLittleEndian)


def _with_request_attributes(procedures: list[str], *, undefined: bool) -> Dataset:
    """A CT header whose Request Attributes Sequence has one item per procedure text ("" leaves it out)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    items = []
    for text in procedures:
        item = Dataset()
        item.RequestedProcedureID = "RP1"
        if text:
            item.RequestedProcedureDescription = text
        item.ScheduledProcedureStepID = "SPS1"
        item.is_undefined_length_sequence_item = undefined
        items.append(item)
    ds.RequestAttributesSequence = Sequence(items)
    ds["RequestAttributesSequence"].is_undefined_length = undefined
    ds.Modality = "CT"
    return ds


@pytest.mark.parametrize("undefined", [False, True], ids=["defined lengths", "undefined lengths"])
@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_requested_procedure_is_read_inside_the_request_attributes(syntax, undefined):
    """The first item that names a procedure gives it, decoded as pydicom decodes it; no file is parsed later."""
    ds = _with_request_attributes(["", "CT ABD/PEL - Leber und Milz \u00fcberpr\u00fcfen"], undefined=undefined)
    facts = scan_instance(_encoded(ds, syntax), syntax)
    reference = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_part10(_encoded(ds, syntax), syntax)), force=True)
    assert facts.request_attributes_procedure == reference.RequestAttributesSequence[1].RequestedProcedureDescription
    assert not facts.has_request_attributes  # read by the scan: nothing left for the tags source to parse
    assert facts.modality == "CT"  # the walk goes on after the sequence


def test_request_attributes_without_a_procedure_and_without_the_sequence():
    none_named = scan_instance(_encoded(_with_request_attributes(["", ""], undefined=True), ExplicitVRLittleEndian),
                               ExplicitVRLittleEndian)  # fmt: skip
    assert none_named.request_attributes_procedure is None and not none_named.has_request_attributes
    plain = _with_request_attributes([], undefined=False)
    del plain.RequestAttributesSequence
    facts = scan_instance(_encoded(plain, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert facts.request_attributes_procedure is None and not facts.has_request_attributes


@pytest.mark.parametrize("inside", ["implicit", "explicit"])
def test_a_request_attributes_sequence_in_un_is_read_or_left_to_pydicom(inside):
    """A UN-encoded sequence holds Implicit VR items (PS3.5 6.2.2); Explicit VR ones, as some encoders send, too."""
    text = b"LIVER VOL "
    element = (struct.pack("<HHL", 0x0032, 0x1060, len(text)) if inside == "implicit"
               else struct.pack("<HH2sH", 0x0032, 0x1060, b"LO", len(text))) + text  # fmt: skip
    un = (struct.pack("<HH2sHL", 0x0040, 0x0275, b"UN", 0, 0xFFFFFFFF)
          + struct.pack("<HHL", 0xFFFE, 0xE000, len(element)) + element
          + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))  # fmt: skip
    data = _element(0x0008, 0x0018, b"UI", b"1.2.3.4\x00") + un + _element(0x0008, 0x0060, b"CS", b"CT")
    facts = scan_instance(data, ExplicitVRLittleEndian)
    assert facts.modality == "CT"  # not refused, and the walk went on
    assert (facts.request_attributes_procedure, facts.has_request_attributes) == ("LIVER VOL", False)


def _request_attributes(items: bytes, length: int = 0xFFFFFFFF) -> bytes:
    """UIDs, a Request Attributes Sequence holding ``items`` (undefined length by default), then the Modality."""
    sequence = struct.pack("<HH2sHL", 0x0040, 0x0275, b"SQ", 0, length) + items
    if length == 0xFFFFFFFF:
        sequence += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return _element(0x0008, 0x0018, b"UI", b"1.2.3.4\x00") + sequence + _element(0x0008, 0x0060, b"CS", b"CT")


def test_a_sequence_of_a_million_empty_items_costs_no_more_than_its_first_items():
    """A crafted sequence (8 MB of empty items, far more once a deflated set inflates) is left to pydicom.

    Walked whole, it took seconds of CPU and hundreds of MB per instance; past the cap of 64 items
    the scan stops and flags the file (without the cap it would report "no procedure named").
    """
    data = _request_attributes(struct.pack("<HHL", 0xFFFE, 0xE000, 0) * 1_000_000)
    facts = scan_instance(data, ExplicitVRLittleEndian)
    assert facts.modality == "CT" and facts.has_request_attributes and facts.request_attributes_procedure is None


def test_an_undefined_length_item_may_not_run_past_its_defined_length_sequence():
    """Its item delimiter beyond the sequence's end: the walk does not read top-level elements as the item's."""
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)  # the sequence's 8 bytes end right after the header
    stray = _element(0x0032, 0x1060, b"LO", b"NOT IN THE ITEM ") + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    data = _request_attributes(item, length=len(item))[:-10] + stray + _element(0x0008, 0x0060, b"CS", b"CT")
    facts = scan_instance(data, ExplicitVRLittleEndian)
    assert facts.request_attributes_procedure is None and facts.has_request_attributes
