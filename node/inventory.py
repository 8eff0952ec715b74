"""What the node holds, as typed records for its HTTP API (and the MCP server over it).

* :func:`spooled_studies` -- the studies in the spool: UIDs, date, descriptions,
  modality and instance count per series (one header read per series);
* :func:`segment_volumes` -- the segments of a written job: volume in mL (from
  the job's report) and the coded concepts of the SEG that was delivered.

Nothing here carries pixel data, local paths or patient identity: these records
are meant to leave the node's process (to an HTTP client, or an assistant).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydantic import BaseModel, Field
from pydicom.errors import InvalidDicomError

from medsegagent.dicom.uids import is_valid_uid

log = logging.getLogger(__name__)

#: Header attributes :func:`spooled_studies` reads (nothing else is parsed).
_STUDY_TAGS = ["StudyDate", "StudyDescription", "Modality", "SeriesDescription", "SeriesNumber"]


class SeriesSummary(BaseModel):
    """One series of a received study."""

    series_uid: str = Field(description="Series Instance UID")
    modality: str = Field(description="DICOM Modality, e.g. CT or MR")
    description: str = Field(description="Series Description (may be empty)")
    number: int | None = Field(description="Series Number")
    instances: int = Field(description="instances received")


class StudySummary(BaseModel):
    """One study the node has received."""

    study_uid: str = Field(description="Study Instance UID")
    study_date: str | None = Field(description="Study Date, YYYY-MM-DD")
    description: str = Field(description="Study Description (may be empty)")
    modalities: list[str] = Field(description="modalities of its series, sorted")
    received_at: datetime = Field(description="when its last instance arrived (UTC)")
    series: list[SeriesSummary]


class CodedTerm(BaseModel):
    """A coded concept (code value, coding scheme, meaning), e.g. SNOMED CT ``10200004`` "Liver"."""

    code: str
    scheme: str = Field(description="coding scheme designator, e.g. SCT for SNOMED CT")
    meaning: str


class SegmentVolume(BaseModel):
    """One segment of a written SEG and its volume."""

    number: int = Field(description="Segment Number in the SEG")
    label: str = Field(description="the registry's label name (the SEG's Segment Label reads 'Kidney, right')")
    volume_ml: float = Field(description="segmented volume in millilitres")
    empty: bool = Field(description="no voxel was segmented")
    category: CodedTerm = Field(description="Segmented Property Category")
    type: CodedTerm = Field(description="Segmented Property Type (SNOMED CT for anatomy)")
    type_modifier: CodedTerm | None = Field(description="laterality modifier of the type, if any")
    agreement: str | None = Field(description="whether the ensembled models agreed on this segment")


class VolumeReport(BaseModel):
    """The segments of a written job."""

    job_id: str
    study_uid: str
    series_uid: str | None = Field(description="the segmented series")
    caution: str | None = Field(description="the result's warning (demo models, disagreement), if any")
    segments: list[SegmentVolume]


def spooled_studies(spool_dir: Path, limit: int = 100) -> list[StudySummary]:
    """The studies in the spool, the most recently received first.

    Parameters
    ----------
    spool_dir : Path
        The node's spool (``<study>/<series>/<instance>.dcm``).
    limit : int
        At most this many studies (headers are read for these only).

    Returns
    -------
    list of StudySummary
        Study-level facts and one :class:`SeriesSummary` per series; a file
        that cannot be read leaves its series with modality ``"?"``.
    """
    if not spool_dir.is_dir():
        return []
    studies = []
    for study_dir in spool_dir.iterdir():
        # Only UID-named folders: .incoming and anything foreign are not studies.
        series_dirs = [d for d in study_dir.iterdir() if d.is_dir() and is_valid_uid(d.name)]
        if is_valid_uid(study_dir.name) and series_dirs:
            studies.append((max(d.stat().st_mtime for d in series_dirs), study_dir, series_dirs))
    studies.sort(key=lambda item: item[0], reverse=True)
    return [_study(study_dir, series_dirs, arrived) for arrived, study_dir, series_dirs in studies[:limit]]


def _study(study_dir: Path, series_dirs: list[Path], arrived: float) -> StudySummary:
    series, study_date, description = [], None, ""
    for series_dir in sorted(series_dirs):
        files = sorted(series_dir.glob("*.dcm"))
        header = _header(files[0]) if files else None
        if header is not None:
            study_date = study_date or _iso_date(header.get("StudyDate"))
            description = description or str(header.get("StudyDescription", ""))
        number = header.get("SeriesNumber") if header is not None else None
        series.append(
            SeriesSummary(
                series_uid=series_dir.name,
                modality=str(header.get("Modality", "") or "?") if header is not None else "?",
                description=str(header.get("SeriesDescription", "")) if header is not None else "",
                number=int(number) if number not in (None, "") else None,
                instances=len(files),
            )
        )
    return StudySummary(
        study_uid=study_dir.name, study_date=study_date, description=description,
        modalities=sorted({s.modality for s in series}), received_at=datetime.fromtimestamp(arrived, UTC),
        series=series,
    )  # fmt: skip


def _header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_STUDY_TAGS)
    except (OSError, InvalidDicomError) as exc:
        log.warning("cannot read %s: %s", path.name, exc)
        return None


def _iso_date(value: Any) -> str | None:
    text = str(value or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else None


def segment_volumes(job_id: str, study_uid: str, report: dict[str, Any], seg_path: Path) -> VolumeReport:
    """Join a job's report (volumes) with the SEG it wrote (coded concepts), segment by segment.

    Parameters
    ----------
    job_id, study_uid : str
        The job.
    report : dict
        The job's ``report.json`` (``segments`` with ``number``, ``label``, ``volume_ml``).
    seg_path : Path
        The SEG the job wrote; only its Segment Sequence is read.

    Returns
    -------
    VolumeReport

    Raises
    ------
    ValueError
        The SEG and the report do not describe the same segments.
    OSError, pydicom.errors.InvalidDicomError
        The SEG cannot be read.
    """
    import highdicom as hd  # on use: listing studies, and importing this module, need none of it

    from medsegagent.dicom.seg import segment_label, truncate_text

    seg = pydicom.dcmread(seg_path, stop_before_pixels=True, specific_tags=["SegmentSequence"])
    described = {d.segment_number: d for d in map(hd.seg.SegmentDescription.from_dataset, seg.SegmentSequence)}
    segments = []
    for entry in report.get("segments", []):
        description = described.get(entry["number"])
        # The SEG names a segment as a radiologist writes it ("Kidney, right"); SEGs written before did not.
        written = (entry["label"], truncate_text(segment_label(entry["label"])))
        if description is None or description.segment_label not in written:
            raise ValueError(f"the SEG of job {job_id} does not hold segment {entry['number']} ({entry['label']})")
        modifier = description.SegmentedPropertyTypeCodeSequence[0].get("SegmentedPropertyTypeModifierCodeSequence")
        segments.append(
            SegmentVolume(
                number=entry["number"], label=entry["label"], volume_ml=entry["volume_ml"], empty=entry["empty"],
                category=_term(description.segmented_property_category),
                type=_term(description.segmented_property_type),
                type_modifier=_term(modifier[0]) if modifier else None, agreement=entry.get("agreement"),
            )
        )  # fmt: skip
    return VolumeReport(
        job_id=job_id, study_uid=study_uid, series_uid=(report.get("series") or {}).get("uid"),
        caution=(report.get("quality") or {}).get("caution"), segments=segments,
    )  # fmt: skip


def _term(concept: pydicom.Dataset) -> CodedTerm:
    return CodedTerm(code=concept.CodeValue, scheme=concept.CodingSchemeDesignator, meaning=concept.CodeMeaning)
