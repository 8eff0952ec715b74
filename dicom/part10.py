"""DICOM Part 10 file header: preamble, ``DICM`` and the File Meta Information.

The intake stores every received data set exactly as it came off the wire,
behind a File Meta Information group (PS3.10 section 7.1).  Building that
group through pydicom's ``FileMetaDataset`` on every C-STORE costs more than
its seven elements are worth: their encoding is fixed (Explicit VR Little
Endian, short values).  :func:`file_meta_header` writes the same bytes directly
(``tests/test_part10.py`` checks them against pydicom's writer).
"""

from __future__ import annotations

import struct

from medsegagent.dicom.uids import checked_uid, is_valid_ae_title

#: 128-byte preamble (all zero: no application profile) and the prefix.
_PREAMBLE = b"\x00" * 128 + b"DICM"


def _short(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One element with a 2-byte length field (UI, SH, AE, UL in Explicit VR Little Endian)."""
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    """A UI value: ASCII, padded to even length with one NUL."""
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    """An SH/AE value: ASCII, padded to even length with one space."""
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def file_meta_header(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str,
    implementation_version_name: str | None = None,
    source_ae_title: str | None = None,
    receiving_ae_title: str | None = None,
) -> bytes:
    """Preamble, ``DICM`` prefix and File Meta Information, encoded.

    Parameters
    ----------
    sop_class_uid, sop_instance_uid : str
        Media Storage SOP Class / Instance UID (0002,0002) / (0002,0003).
    transfer_syntax_uid : str
        Transfer Syntax UID (0002,0010) of the data set that follows.
    implementation_class_uid : str
        Implementation Class UID (0002,0012) of the writer.
    implementation_version_name : str, optional
        Implementation Version Name (0002,0013), at most 16 characters.
    source_ae_title : str, optional
        Source Application Entity Title (0002,0016): the AE that sent the
        data set (as DCMTK's storescp records it), at most 16 characters.
    receiving_ae_title : str, optional
        Receiving Application Entity Title (0002,0018): the AE title the
        sender called (the node's own, or a preset's), at most 16 characters.

    Returns
    -------
    bytes
        Everything of a Part 10 file that precedes the data set.

    Raises
    ------
    ValueError
        For an invalid UID, or a version name / AE title that is too long or
        not printable ASCII (the caller validated the request; this guards the
        file format).
    """
    for what, uid in (("SOP Class UID", sop_class_uid), ("SOP Instance UID", sop_instance_uid),
                      ("Transfer Syntax UID", transfer_syntax_uid),
                      ("Implementation Class UID", implementation_class_uid)):  # fmt: skip
        checked_uid(uid, what)
    for what, text in (("Implementation Version Name", implementation_version_name),
                       ("Source AE Title", source_ae_title), ("Receiving AE Title", receiving_ae_title)):  # fmt: skip
        if text is not None and not is_valid_ae_title(text):
            raise ValueError(f"{what} {text!r} is not 1-16 printable ASCII characters")
    body = [
        # (0002,0001) OB: 2-byte reserved field and a 4-byte length.
        struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
        _short(0x0002, 0x0002, b"UI", _uid(sop_class_uid)),
        _short(0x0002, 0x0003, b"UI", _uid(sop_instance_uid)),
        _short(0x0002, 0x0010, b"UI", _uid(transfer_syntax_uid)),
        _short(0x0002, 0x0012, b"UI", _uid(implementation_class_uid)),
    ]
    if implementation_version_name:
        body.append(_short(0x0002, 0x0013, b"SH", _text(implementation_version_name)))
    if source_ae_title:
        body.append(_short(0x0002, 0x0016, b"AE", _text(source_ae_title)))
    if receiving_ae_title:
        body.append(_short(0x0002, 0x0018, b"AE", _text(receiving_ae_title)))
    group = b"".join(body)
    length = _short(0x0002, 0x0000, b"UL", struct.pack("<I", len(group)))
    return _PREAMBLE + length + group
