"""Identifier validation: a UID must be a UID before it becomes part of a path; AE titles."""

from __future__ import annotations

import re
import uuid

#: PS3.5 9.1: digits and dots, components without leading zeros, at most 64 chars.  Used with
#: ``fullmatch`` only: ``$`` (and ``match``) would accept a trailing newline, which then lands in paths.
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


#: Implementation Class UID of the node's DICOM implementation (PS3.7 D.3.3.2):
#: ``2.25`` and the UUID ``uuid5(NAMESPACE_URL, "urn:medsegagent:implementation")``.
MEDSEGAGENT_IMPLEMENTATION_UID = "2.25.63706015013046705325906277799079531541"
#: Implementation Version Name sent with it (at most 16 characters).
MEDSEGAGENT_IMPLEMENTATION_VERSION = "MEDSEGAGENT_01"


#: Namespace of the name-based UUIDs behind :func:`derived_uid`.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:medsegagent:dicom")


def derived_uid(*parts: object) -> str:
    """UID ``2.25.<uuid>`` that is a pure function of ``parts`` (same parts, same UID).

    The one scheme behind every UID the node derives rather than draws: SEG,
    SR and Secondary Capture series and instances (so a re-send replaces
    rather than duplicates), segment Tracking UIDs, the Device UID, and the
    phantoms' study, series and instances.

    Notes
    -----
    A name-based (version 5) UUID of the parts under the ``2.25`` root
    (ISO/IEC 9834-8, PS3.5 B.2): no registered organisation root is needed.
    ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` would ignore
    the entropy and return a random UUID.
    """
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


class InvalidUIDError(ValueError):
    """A value that is not a valid DICOM UID."""


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a syntactically valid DICOM UID."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def checked_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` if it is a valid UID, else raise :class:`InvalidUIDError`.

    Parameters
    ----------
    value : object
        Candidate UID (typically from a received dataset).
    what : str
        Name used in the error message, e.g. ``"SOPInstanceUID"``.
    """
    text = str(value) if value is not None else ""
    if not is_valid_uid(text):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InvalidUIDError(f"{what} {shown!r} is not a valid DICOM UID")
    return text


def is_valid_ae_title(value: str) -> bool:
    """True when ``value`` is a usable AE title (PS3.5 AE): 1-16 printable ASCII characters, no backslash."""
    return bool(value.strip()) and len(value) <= 16 and value.isascii() and value.isprintable() and "\\" not in value
