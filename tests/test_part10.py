"""The File Meta Information the intake writes by hand equals pydicom's, byte for byte."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from medsegagent.dicom.part10 import file_meta_header


def _pydicom_header(sop_class: str, sop: str, syntax: str, version: str | None, source: str | None) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.3811.3.0.4"
    if version:
        meta.ImplementationVersionName = version
    if source:
        meta.SourceApplicationEntityTitle = source
    out = BytesIO()
    write_file_meta_info(out, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + out.getvalue()


@pytest.mark.parametrize(
    ("sop", "syntax", "version", "source"),
    [
        ("1.2.3.4.5", ExplicitVRLittleEndian, "PYNETDICOM_304", "MODALITY"),  # odd UID: NUL padding
        ("1.2.3.4.56", ImplicitVRLittleEndian, "ODDVERSION", "CT1"),  # odd AE title: space padding
        ("2.25.1234567890123456789012345678901234567", JPEG2000Lossless, "X", None),  # no source AE
    ],
)
def test_header_equals_pydicoms_encoding(sop, syntax, version, source):
    ours = file_meta_header(sop_class_uid=CTImageStorage, sop_instance_uid=sop, transfer_syntax_uid=syntax,
                            implementation_class_uid="1.2.826.0.1.3680043.9.3811.3.0.4",
                            implementation_version_name=version, source_ae_title=source)  # fmt: skip
    assert ours == _pydicom_header(CTImageStorage, sop, syntax, version, source)
    meta = pydicom.filereader.read_preamble(BytesIO(ours), force=False)
    assert meta == b"\x00" * 128


def test_header_and_raw_data_set_read_back_as_a_file(tmp_path):
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientName = CTImageStorage, "1.2.3.9", "DOE^JANE"
    raw = DicomBytesIO()
    raw.is_implicit_VR, raw.is_little_endian = True, True  # as sent on the wire
    pydicom.filewriter.write_dataset(raw, ds)
    path = tmp_path / "x.dcm"
    header = file_meta_header(sop_class_uid=CTImageStorage, sop_instance_uid="1.2.3.9",
                              transfer_syntax_uid=ImplicitVRLittleEndian, implementation_class_uid="1.2.3",
                              source_ae_title="PACS")  # fmt: skip
    path.write_bytes(header + raw.getvalue())
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert back.file_meta.SourceApplicationEntityTitle == "PACS"
    assert back.PatientName == "DOE^JANE" and back.SOPInstanceUID == "1.2.3.9"


@pytest.mark.parametrize(
    ("field", "value"),
    [("sop_instance_uid", "1.2.03"), ("transfer_syntax_uid", "../x"), ("source_ae_title", "A" * 17),
     ("implementation_version_name", "BAD\\NAME")],
)  # fmt: skip
def test_invalid_values_are_refused(field, value):
    kwargs = {"sop_class_uid": CTImageStorage, "sop_instance_uid": "1.2.3", "transfer_syntax_uid":
              ExplicitVRLittleEndian, "implementation_class_uid": "1.2.3", field: value}  # fmt: skip
    with pytest.raises(ValueError):
        file_meta_header(**kwargs)
