"""The study manifest: what the intake learnt about each instance, kept with the study.

The intake's byte scanner (:func:`~medsegagent.dicom.scan.scan_instance`)
reads every received instance's UIDs, pixel description, geometry and the
few text attributes the node decides on.  Rather than forget them, the
intake appends them, one JSON line per stored instance, to the study's
journal ``<spool>/<study>/.instances.jsonl`` (:func:`record_instance`).
When a job runs, :func:`load_manifest` folds the journal into a
:class:`StudyManifest` -- series, SOP classes, modality and routing
attributes, Frame of Reference, geometry, instance files in slice order,
and the request carriers (SR files, worklist and tag keys) -- and keeps it
as ``<spool>/<study>/manifest.json`` (written atomically).

The series choice, the routing modality and the SR, worklist and tags
sources read the manifest; the chosen series' files are then parsed once,
together with their pixel data.  The manifest is derived data: one whose
file list differs from the spool's, or that is missing or unreadable, is
rebuilt from the journal, and an instance the journal lacks (a crash
between the rename and the append, a spool reconciled at start) is scanned
again from its file, with a log line.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from medsegagent.dicom.modality import study_modality
from medsegagent.dicom.scan import DataSetScanError, InstanceFacts, inflate, scan, scan_instance
from medsegagent.dicom.series import SeriesInfo, holds_volume

log = logging.getLogger(__name__)

#: The study's journal of scanned instances (appended by every intake process).
JOURNAL = ".instances.jsonl"
#: The folded manifest, rewritten whenever the spool's files differ from it.
MANIFEST = "manifest.json"
#: Bumped when the manifest's form changes: an older file is rebuilt, not misread.
MANIFEST_VERSION = 2

_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_DEFLATED = "1.2.840.10008.1.2.1.99"
_TRANSFER_SYNTAX_UID = 0x00020010
_ROUTING_TEXT = ("SeriesDescription", "SequenceName", "ProtocolName", "ContrastBolusAgent")


class SeriesKind(StrEnum):
    """What a series is to the node."""

    #: A volume the models can segment (pixel data with plane geometry).
    IMAGE = "image"
    #: Structured reports: where a request may be written.
    SR = "sr"
    #: Anything else (SEG, Secondary Capture, a single image without geometry ...).
    OTHER = "other"


@dataclass(frozen=True)
class InstanceEntry:
    """One instance of a series.

    Attributes
    ----------
    file : str
        Path relative to the study folder (``<series>/<sop>.dcm``).
    sop_instance_uid, sop_class_uid : str
        As in the data set.
    frames : int
        Number of Frames (1 for single-frame images and non-images).
    position : tuple of float or None
        Image Position (Patient), when present at the top level.
    """

    file: str
    sop_instance_uid: str
    sop_class_uid: str
    frames: int = 1
    position: tuple[float, ...] | None = None


@dataclass(frozen=True)
class SeriesEntry:
    """One series of the study, its instances in slice order (along the slice normal)."""

    series_instance_uid: str
    modality: str
    kind: SeriesKind
    sop_class_uids: tuple[str, ...]
    instances: tuple[InstanceEntry, ...]
    frame_of_reference_uid: str | None = None
    series_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    orientation: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, ...] | None = None
    image_type: tuple[str, ...] = ()
    #: ``(keyword, text)`` of SeriesDescription, SequenceName, ProtocolName, ContrastBolusAgent.
    texts: tuple[tuple[str, str], ...] = ()

    @property
    def description(self) -> str:
        """Series Description (``""`` when absent)."""
        return dict(self.texts).get("SeriesDescription", "")

    @property
    def number_of_frames(self) -> int:
        """Frames over all instances."""
        return sum(i.frames for i in self.instances)

    def routing_header(self) -> dict[str, object]:
        """The attributes :func:`~medsegagent.dicom.modality.study_modality` reads.

        A blank Modality is ``None``, as for a header without one: such a study is refused as an
        unsupported modality, never routed as if the modality were unknown.
        """
        return {"Modality": self.modality or None, "ImageType": list(self.image_type), **dict(self.texts)}

    def info(self, study_dir: Path, study_uid: str) -> SeriesInfo:
        """The series as :func:`~medsegagent.dicom.series.scan_folder` describes one, files in slice order."""
        return SeriesInfo(
            series_instance_uid=self.series_instance_uid, modality=self.modality, description=self.description,
            files=[study_dir / i.file for i in self.instances], sop_class_uids=set(self.sop_class_uids),
            study_instance_uid=study_uid, is_image=self.kind is SeriesKind.IMAGE,
            number_of_frames=self.number_of_frames, series_number=self.series_number, routing=self.routing_header(),
        )  # fmt: skip


@dataclass(frozen=True)
class RequestKeys:
    """Study attributes the instruction sources match or read (the first non-blank value in the study)."""

    accession_number: str = ""
    patient_id: str = ""
    patient_name: str = ""
    requested_procedure_description: str = ""
    study_description: str = ""
    #: The Requested Procedure Description inside a Request Attributes Sequence (after the top-level one).
    request_attributes_procedure: str = ""


@dataclass(frozen=True)
class StudyManifest:
    """A study as the intake scanned it: series, geometry facts and request carriers.

    Attributes
    ----------
    study_instance_uid : str
        The study.
    series : tuple of SeriesEntry
        Every series, by Series Instance UID order.
    keys : RequestKeys
        For the worklist query and the tags source.
    request_attribute_files : tuple of str
        Instances with a Request Attributes Sequence the scan could not read
        into (the tags source parses those files); the scan reads the usual
        ones itself, into ``keys.request_attributes_procedure``.
    """

    study_instance_uid: str
    series: tuple[SeriesEntry, ...]
    keys: RequestKeys = RequestKeys()
    request_attribute_files: tuple[str, ...] = ()
    version: int = MANIFEST_VERSION

    @property
    def files(self) -> frozenset[str]:
        """Every instance file, relative to the study folder."""
        return frozenset(i.file for s in self.series for i in s.instances)

    @property
    def sr_files(self) -> tuple[str, ...]:
        """Files of the study's SR documents (where a request may be written)."""
        return tuple(i.file for s in self.series for i in s.instances if i.sop_class_uid.startswith(_SR_PREFIX))

    def series_infos(self, study_dir: Path) -> dict[str, SeriesInfo]:
        """The series as :class:`SeriesInfo` (no header parsed), for the series choice and :func:`read_study`."""
        return {s.series_instance_uid: s.info(Path(study_dir), self.study_instance_uid) for s in self.series}

    def routing_modality(self) -> str | None:
        """The study's routing modality from its image series, largest first (``None`` without one)."""
        images = sorted((s for s in self.series if s.kind is SeriesKind.IMAGE), key=lambda s: -s.number_of_frames)
        return study_modality(s.routing_header() for s in images)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (:meth:`from_json` reads it back)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StudyManifest:
        """Read :meth:`to_json`'s form.

        Raises
        ------
        KeyError, TypeError, ValueError
            When ``data`` is not a manifest of this version.
        """
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {data.get('version')!r}, not {MANIFEST_VERSION}")
        series = tuple(_series_from_json(s) for s in data["series"])
        return cls(str(data["study_instance_uid"]), series, RequestKeys(**data["keys"]),
                   tuple(data["request_attribute_files"]))  # fmt: skip


def _tuple(value: Any) -> tuple | None:
    return None if value is None else tuple(tuple(v) if isinstance(v, list) else v for v in value)


def _series_from_json(data: Mapping[str, Any]) -> SeriesEntry:
    instances = tuple(InstanceEntry(i["file"], i["sop_instance_uid"], i["sop_class_uid"], int(i["frames"]),
                                    _tuple(i["position"])) for i in data["instances"])  # fmt: skip
    values = {f.name: data[f.name] for f in fields(SeriesEntry)}
    values.update(kind=SeriesKind(data["kind"]), instances=instances, sop_class_uids=tuple(data["sop_class_uids"]),
                  orientation=_tuple(data["orientation"]), pixel_spacing=_tuple(data["pixel_spacing"]),
                  image_type=tuple(data["image_type"]), texts=_tuple(data["texts"]))  # fmt: skip
    return SeriesEntry(**values)


# -- the journal (intake) --------------------------------------------------------------------------
def record_instance(study_dir: Path, path: Path, facts: InstanceFacts) -> None:
    """Append what the intake scanned of the instance stored at ``path`` to its study's journal.

    One ``write`` of one line on an ``O_APPEND`` descriptor: lines of
    concurrent intake processes do not interleave.  No fsync: the journal
    is a cache of the files, rebuilt from them when it lacks one.

    Raises
    ------
    OSError
        When the journal cannot be written (the caller logs it; the instance stays stored).
    """
    line = json.dumps({"file": path.relative_to(study_dir).as_posix(), "facts": asdict(facts)}) + "\n"
    fd = os.open(study_dir / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _facts_from_json(data: Mapping[str, Any]) -> InstanceFacts:
    values = {f.name: data[f.name] for f in fields(InstanceFacts) if f.name in data}
    for name in ("specific_character_set", "image_position", "image_orientation", "pixel_spacing", "image_type",
                 "text_attributes"):  # fmt: skip
        if values.get(name) is not None:
            values[name] = _tuple(values[name])
    return InstanceFacts(**values)


def _journal(study_dir: Path) -> dict[str, InstanceFacts]:
    """The journal's facts by file (a re-sent instance's newest line wins; a torn last line is skipped)."""
    found: dict[str, InstanceFacts] = {}
    try:
        lines = (study_dir / JOURNAL).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return found
    for line in lines:
        try:
            record = json.loads(line)
            found[record["file"]] = _facts_from_json(record["facts"])
        except (ValueError, KeyError, TypeError):
            continue
    return found


def scan_file(path: Path) -> InstanceFacts:
    """Scan a spooled Part 10 file as the intake scanned it when it arrived.

    Raises
    ------
    DataSetScanError
        When the file is not a Part 10 file the scanner can read.
    OSError
        When it cannot be read.
    """
    data = path.read_bytes()
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise DataSetScanError("not a DICOM Part 10 file with a File Meta Information Group Length")
    (group_length,) = struct.unpack_from("<L", data, 140)
    start = 144 + group_length
    meta = scan(memoryview(data)[132:start], "1.2.840.10008.1.2.1", (_TRANSFER_SYNTAX_UID,))
    if _TRANSFER_SYNTAX_UID not in meta:
        raise DataSetScanError("the File Meta Information names no Transfer Syntax UID")
    syntax = meta[_TRANSFER_SYNTAX_UID].value.rstrip(b"\x00 ").decode("ascii")
    body = memoryview(data)[start:]
    return scan_instance(inflate(body, 256 << 20) if syntax == _DEFLATED else body, syntax)


# -- the fold (processor) ---------------------------------------------------------------------------
def load_manifest(study_dir: Path) -> StudyManifest:
    """The manifest of the spooled study in ``study_dir``: the stored one while it lists the spool's files.

    Otherwise it is folded from the journal (files the journal lacks are
    scanned again), stored atomically and returned; each rebuild is logged.
    Files that no longer scan are left out with a warning (the job then
    reports what is missing, as for a study that lacks them).
    """
    study_dir = Path(study_dir)
    # The spool keeps <series>/<sop>.dcm; a study folder copied in by hand may be flat.
    on_disk = {p.relative_to(study_dir).as_posix() for p in study_dir.rglob("*.dcm")}
    stored = _stored_manifest(study_dir)
    if stored is not None and stored.files == on_disk:
        return stored
    journal = _journal(study_dir)
    unjournaled = sorted(on_disk - journal.keys())
    log.info("study %s: manifest %s; folding %d journaled instance(s), scanning %d file(s) again",
             study_dir.name, "stale" if stored else "missing", len(on_disk) - len(unjournaled),
             len(unjournaled))  # fmt: skip
    facts = {name: journal[name] for name in on_disk & journal.keys()}
    for name in unjournaled:
        try:
            facts[name] = scan_file(study_dir / name)
        except (DataSetScanError, OSError) as exc:
            log.warning("study %s: %s left out of the manifest: %s", study_dir.name, name, exc)
    manifest = build_manifest(study_dir.name, facts)
    _store(study_dir, manifest)
    return manifest


def _stored_manifest(study_dir: Path) -> StudyManifest | None:
    try:
        return StudyManifest.from_json(json.loads((study_dir / MANIFEST).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:  # torn, hand-edited or from another version
        log.warning("study %s: %s unreadable (%s); rebuilding it", study_dir.name, MANIFEST, exc)
        return None


def _store(study_dir: Path, manifest: StudyManifest) -> None:
    """Write ``manifest.json`` atomically (temporary file, fsync, rename): a crash leaves old or new."""
    temporary = study_dir / f".{uuid.uuid4().hex}.tmp"
    try:
        with open(temporary, "w") as handle:
            json.dump(manifest.to_json(), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, study_dir / MANIFEST)
    except OSError as exc:  # the manifest is a cache: the job goes on with the one in memory
        log.warning("study %s: cannot store %s: %s", study_dir.name, MANIFEST, exc)
        temporary.unlink(missing_ok=True)


def build_manifest(study_uid: str, facts: Mapping[str, InstanceFacts]) -> StudyManifest:
    """Fold scanned instances (by file relative to the study folder) into a :class:`StudyManifest`."""
    by_series: dict[str, list[tuple[str, InstanceFacts]]] = {}
    for name in sorted(facts):
        by_series.setdefault(facts[name].series_instance_uid or "", []).append((name, facts[name]))
    series = tuple(_series_entry(uid, members) for uid, members in sorted(by_series.items()) if uid)
    texts: dict[str, str] = {}
    in_request = ""
    for name in sorted(facts):
        for keyword, value in facts[name].text_attributes:
            texts.setdefault(keyword, value)
        in_request = in_request or facts[name].request_attributes_procedure or ""
    keys = RequestKeys(texts.get("AccessionNumber", ""), texts.get("PatientID", ""), texts.get("PatientName", ""),
                       texts.get("RequestedProcedureDescription", ""), texts.get("StudyDescription", ""),
                       in_request)  # fmt: skip
    carriers = tuple(name for name in sorted(facts) if facts[name].has_request_attributes)
    return StudyManifest(study_uid, series, keys, carriers)


def _series_entry(uid: str, members: list[tuple[str, InstanceFacts]]) -> SeriesEntry:
    first = members[0][1]
    sop_classes = tuple(sorted({f.sop_class_uid or "" for _, f in members}))
    image = all(
        holds_volume(f.sop_class_uid or "", f.pixel_data_length is not None,
                     f.image_orientation is not None or f.has_functional_groups)
        for _, f in members
    )  # fmt: skip
    kind = SeriesKind.IMAGE if image else SeriesKind.OTHER
    if all(c.startswith(_SR_PREFIX) for c in sop_classes):
        kind = SeriesKind.SR
    instances = [InstanceEntry(name, f.sop_instance_uid or "", f.sop_class_uid or "", f.number_of_frames or 1,
                               f.image_position) for name, f in members]  # fmt: skip
    texts = dict(first.text_attributes)
    return SeriesEntry(
        series_instance_uid=uid, modality=first.modality or "", kind=kind, sop_class_uids=sop_classes,
        instances=_slice_order(instances, first.image_orientation), frame_of_reference_uid=first.frame_of_reference_uid,
        series_number=first.series_number, rows=first.rows, columns=first.columns,
        orientation=first.image_orientation, pixel_spacing=first.pixel_spacing, image_type=first.image_type or (),
        texts=tuple((k, texts[k]) for k in _ROUTING_TEXT if k in texts),
    )  # fmt: skip


def _slice_order(
    instances: Iterable[InstanceEntry], orientation: tuple[float, ...] | None
) -> tuple[InstanceEntry, ...]:
    """Instances along the slice normal (the order :func:`read_series` stacks them in); others by file name.

    Sorting here lets the reader decode the files straight into the volume's order.  Inconsistent
    geometry is not judged here: the reader refuses it with the reason.
    """
    ordered = list(instances)
    if orientation is None or len(orientation) != 6 or not all(np.isfinite(orientation)):
        return tuple(ordered)
    normal = np.cross(orientation[:3], orientation[3:])

    def distance(entry: InstanceEntry) -> tuple[int, float]:
        position = entry.position
        if position is None or len(position) != 3 or not all(np.isfinite(position)):
            return 1, 0.0
        return 0, float(np.dot(position, normal))

    return tuple(sorted(ordered, key=distance))
