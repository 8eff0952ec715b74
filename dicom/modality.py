"""Routing modality from DICOM headers.

The router filters datasets by modality; for a study that modality comes
from the headers, never from the request text.  MR series are qualified by
their sequence (``MR:T1``, ``MR:T1C``, ``MR:T2``, ``MR:FLAIR``, ``MR:DWI``,
``MR:ADC``) where the headers say so; a study with both PET and CT series is
``PT+CT``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import pydicom

from medsegagent.dicom.series import SeriesInfo, image_series

#: Series-description patterns for MR sequences, most specific first.
_MR_SEQUENCE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("MR:ADC", re.compile(r"\b(adc|apparent diffusion)\b", re.I)),
    ("MR:DWI", re.compile(r"\b(dwi|diffusion|trace|b ?1000|ep2d_diff)\b", re.I)),
    ("MR:FLAIR", re.compile(r"\b(flair|dark ?fluid|tirm)\b", re.I)),
    ("MR:T2", re.compile(r"\bt2(?!\*)|\b(haste|tse_t2|space_t2)\b", re.I)),
    ("MR:T1", re.compile(r"\bt1|\b(mprage|vibe|spgr|bravo|lava|dixon)\b", re.I)),
)
_CONTRAST_PATTERN = re.compile(r"(\+ ?c\b|\bpost\b|\bgad|\bgd\b|\bce\b|contrast|\bkm\b)", re.I)


def mr_sequence(header: Mapping[str, object]) -> str:
    """Qualified MR modality of one series, ``MR`` when undecidable.

    Parameters
    ----------
    header : mapping
        ``SeriesDescription``, ``SequenceName``, ``ScanningSequence``,
        ``ContrastBolusAgent`` and ``ImageType`` where present.
    """
    text = " ".join(
        str(header.get(key, "") or "") for key in ("SeriesDescription", "SequenceName", "ProtocolName")
    ).replace("_", " ")
    for modality, pattern in _MR_SEQUENCE_PATTERNS:
        if pattern.search(text):
            if modality == "MR:T1" and (header.get("ContrastBolusAgent") or _CONTRAST_PATTERN.search(text)):
                return "MR:T1C"
            return modality
    image_type = [str(v).upper() for v in (header.get("ImageType") or [])]
    if "ADC" in image_type:
        return "MR:ADC"
    if "DIFFUSION" in image_type or "TRACE" in image_type:
        return "MR:DWI"
    return "MR"


def study_modality(series_headers: Iterable[Mapping[str, object]]) -> str | None:
    """Routing modality of a study from its image series' headers.

    Returns
    -------
    str or None
        ``PT+CT`` when PET and CT series are both present, the qualified MR
        sequence of the largest MR series, else the DICOM Modality of the
        image series (``CT``, ``PT``, ``US``); ``None`` for no image series.
    """
    headers = list(series_headers)
    modalities = {str(h.get("Modality", "")) for h in headers}
    if {"PT", "CT"} <= modalities:
        return "PT+CT"
    for header in headers:
        if header.get("Modality") == "MR":
            return mr_sequence(header)
    for modality in ("CT", "PT", "US"):
        if modality in modalities:
            return modality
    return next(iter(sorted(modalities)), None) or None


#: Header attributes :func:`mr_sequence` and :func:`study_modality` look at.
_ROUTING_KEYS = ("Modality", "SeriesDescription", "SequenceName", "ProtocolName", "ContrastBolusAgent", "ImageType")


def routing_modality(series: Mapping[str, SeriesInfo]) -> str | None:
    """Routing modality of a scanned folder (output of :func:`~medsegagent.dicom.series.scan_folder`).

    Reads one header per image series, unless the series carries its routing attributes
    (:attr:`SeriesInfo.routing`); ``None`` when there is no image series.
    """
    headers = []
    for info in image_series(dict(series)):
        if info.routing is not None:
            headers.append(info.routing)
            continue
        ds = pydicom.dcmread(info.files[0], stop_before_pixels=True)
        headers.append({key: ds.get(key) for key in _ROUTING_KEYS})
    return study_modality(headers)
