"""UIDs are validated before they form paths."""

import pytest

from medsegagent.dicom.uids import InvalidUIDError, checked_uid, is_valid_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.1", "0.1", "1.2.3.0.45"])
def test_valid(uid):
    assert is_valid_uid(uid)
    assert checked_uid(uid) == uid


@pytest.mark.parametrize(
    "uid", ["", "../../etc/passwd", "1.2.3/4", "1..2", "1.02", "1.2.", "1" * 65, "1.2.3\x00", None, "1.2 .3"]
)
def test_invalid(uid):
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUIDError):
        checked_uid(uid, "SOPInstanceUID")
