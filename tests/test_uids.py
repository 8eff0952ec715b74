"""UIDs are validated before they form paths."""

import pytest

from medsegagent.dicom.uids import InvalidUIDError, checked_uid, is_valid_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.1", "0.1", "1.2.3.0.45"])
def test_valid(uid):
    assert is_valid_uid(uid)
    assert checked_uid(uid) == uid


@pytest.mark.parametrize(
    "uid",
    ["", "../../etc/passwd", "1.2.3/4", "1..2", "1.02", "1.2.", "1" * 65, "1.2.3\x00", None, "1.2 .3", "1.2.3\n",
     "\n1.2.3", "1.2.3\r\n"],
)  # fmt: skip
def test_invalid(uid):
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUIDError):
        checked_uid(uid, "SOPInstanceUID")


def test_implementation_class_uid_is_the_documented_uuid_derived_uid():
    """The Implementation Class UID is 2.25 + the UUID the conformance statement names, and valid."""
    import uuid

    from medsegagent.dicom.uids import MEDSEGAGENT_IMPLEMENTATION_UID, MEDSEGAGENT_IMPLEMENTATION_VERSION

    expected = uuid.uuid5(uuid.NAMESPACE_URL, "urn:medsegagent:implementation").int
    assert f"2.25.{expected}" == MEDSEGAGENT_IMPLEMENTATION_UID
    assert is_valid_uid(MEDSEGAGENT_IMPLEMENTATION_UID)
    assert 0 < len(MEDSEGAGENT_IMPLEMENTATION_VERSION) <= 16
