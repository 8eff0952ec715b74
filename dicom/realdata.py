"""The public real scans the demo, the benchmarks and the tests put through the node.

* **Colin27**, a real T1-weighted MRI (27 averaged 1.5 T scans of one
  volunteer, 1 mm isotropic), and its brain-extracted version, from Debian's
  ``mricron-data`` (``/usr/share/mricron/templates/ch2.nii.gz`` and
  ``ch2bet.nii.gz``).  :func:`write_colin27_series` writes it as a DICOM MR
  series with the node's own writer, so it reaches the node as a scanner's
  series would.
* **A real CT series**: ``tests/reference_files/example_ct_dicom/`` of the
  TotalSegmentator source distribution (``pip download --no-binary :all:
  totalsegmentator==2.18.0``): 20 slices of a Siemens Biograph CT, JPEG 2000
  lossless.  It was anonymised down to empty Study, Series and SOP Instance
  UIDs and an empty SOP Class UID in the data set (the File Meta keeps the
  SOP Class and Instance); :func:`repair_anonymised_series` gives it valid
  UIDs so that it can be sent by C-STORE.  Nothing else is changed.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from medsegagent.dicom.image_writer import MrProtocol, StudyInfo, deterministic_uid, write_series
from medsegagent.dicom.nifti import axial_lps, volume_from_nifti
from medsegagent.dicom.volume import Geometry, Volume

__all__ = [
    "COLIN27_PROTOCOL",
    "TOTALSEG_SDIST",
    "Colin27",
    "RealDataError",
    "colin27",
    "extract_totalseg_reference_files",
    "find_totalseg_sdist",
    "repair_anonymised_series",
    "write_colin27_series",
]

#: Where Debian's ``mricron-data`` installs Colin27.
_MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")

#: File name of the TotalSegmentator source distribution that carries the real CT.
TOTALSEG_SDIST = "totalsegmentator-2.18.0.tar.gz"

#: Colin27's acquisition (Holmes et al., J Comput Assist Tomogr 1998): a 1.5 T
#: T1-weighted spoiled gradient echo, TR 18 ms, TE 10 ms, flip 30 degrees, 27 averages.
COLIN27_PROTOCOL = MrProtocol(
    scanning_sequence="GR",
    sequence_variant=("SP",),
    scan_options=(),
    sequence_name="T1 FFE",
    repetition_time_ms=18.0,
    echo_time_ms=10.0,
    flip_angle_deg=30.0,
    field_strength_t=1.5,
    averages=27,
)


class RealDataError(RuntimeError):
    """A real scan is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Colin27:
    """The Colin27 files.

    Attributes
    ----------
    t1 : Path
        The T1-weighted image (``ch2.nii.gz``).
    brain : Path
        Its brain-extracted version (``ch2bet.nii.gz``): the reference brain mask is its non-zero voxels.
    """

    t1: Path
    brain: Path

    def volume(self) -> Volume:
        """The T1 as a volume, laid out as an axial stack."""
        return axial_lps(volume_from_nifti(self.t1, modality="MR", meta={"SeriesDescription": "T1 (Colin27)"}))

    def brain_mask(self, geometry: Geometry | None = None) -> np.ndarray:
        """The reference brain mask (``ch2bet`` > 0) on :meth:`volume`'s grid (the two files share one grid).

        Raises
        ------
        RealDataError
            When the files' grids differ, or ``geometry`` (the grid the caller
            compares on) is not theirs.
        """
        brain = axial_lps(volume_from_nifti(self.brain, modality="MR"))
        for other, what in ((self.volume().geometry, str(self.t1)), (geometry, "the grid compared on")):
            if other is not None and not brain.geometry.same_grid(other):
                raise RealDataError(f"{self.brain} is not on the grid of {what}")
        return brain.array > 0


def colin27(folder: Path | None = None) -> Colin27:
    """Locate Colin27 (``$MEDSEG_COLIN27_DIR``, else Debian's ``mricron-data``).

    Raises
    ------
    RealDataError
        When it is not installed.
    """
    folder = Path(folder or os.environ.get("MEDSEG_COLIN27_DIR") or _MRICRON_TEMPLATES)
    found = Colin27(folder / "ch2.nii.gz", folder / "ch2bet.nii.gz")
    missing = [p for p in (found.t1, found.brain) if not p.is_file()]
    if missing:
        raise RealDataError(
            f"Colin27 is not installed ({', '.join(map(str, missing))} missing): "
            "install Debian's mricron-data (apt-get install mricron-data) or set MEDSEG_COLIN27_DIR"
        )
    return found


def write_colin27_series(out_dir: Path, *, study_instance_uid: str | None = None) -> list[Path]:
    """Write Colin27's T1 as a DICOM MR series (one file per axial slice).

    Parameters
    ----------
    out_dir : Path
        Folder for the files.
    study_instance_uid : str, optional
        Defaults to a UID derived from the name ``colin27``.

    Returns
    -------
    list of Path
        The files, in instance order.
    """
    volume = colin27().volume()
    study = StudyInfo(
        study_instance_uid=study_instance_uid or deterministic_uid("colin27", "study"),
        patient_name="COLIN27^T1",
        patient_id="COLIN27",
        patient_sex="M",
        patient_birth_date="19620101",
        study_description="MR HEAD",
        study_date="19980101",
        institution_name="Montreal Neurological Institute",
        station_name="MNI15T",
    )
    return write_series(
        volume.array,
        volume.geometry,
        "MR",
        out_dir,
        study=study,
        series_number=1,
        series_description="T1 3D FFE (Colin27)",
        frame_of_reference_uid=deterministic_uid(study.study_instance_uid, "frame-of-reference"),
        window=(60.0, 160.0),
        body_part="HEAD",
        mr_protocol=COLIN27_PROTOCOL,
    )


def find_totalseg_sdist(folder: Path | None = None) -> Path:
    """The TotalSegmentator source distribution (``$MEDSEG_REALDATA``, else ``./.cache/realdata``).

    Raises
    ------
    RealDataError
        With the command that fetches it.
    """
    folder = Path(folder or os.environ.get("MEDSEG_REALDATA") or Path.cwd() / ".cache" / "realdata")
    path = folder / TOTALSEG_SDIST
    if not path.is_file():
        raise RealDataError(
            f"{path} is missing: fetch it with `pip download --no-deps --no-binary :all: "
            f"totalsegmentator==2.18.0 -d {folder}` (scripts/bootstrap.sh test does)"
        )
    return path


def extract_totalseg_reference_files(sdist: Path, out_dir: Path) -> Path:
    """Unpack the sdist's ``tests/reference_files`` into ``out_dir``; returns that folder.

    Only regular files under ``tests/reference_files/`` are extracted, by
    their name below it (no path from the archive is trusted).
    """
    target = Path(out_dir) / "reference_files"
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if not member.isfile() or "reference_files" not in parts or ".." in parts:
                continue
            relative = Path(*parts[parts.index("reference_files") + 1 :])
            if parts[parts.index("reference_files") - 1] != "tests" or not relative.parts:
                continue
            dest = target / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # a regular file
            dest.write_bytes(source.read())
    if not target.is_dir():
        raise RealDataError(f"{sdist} has no tests/reference_files")
    return target


def repair_anonymised_series(src_dir: Path, out_dir: Path, *, key: str) -> list[Path]:
    """Copy an over-anonymised series with the UIDs a C-STORE needs.

    SOP Class and SOP Instance UID come back from the File Meta Information
    (which the anonymiser kept); empty Study and Series Instance UIDs get
    UIDs derived from ``key``.  Pixel data and every other attribute stay as
    they are (the transfer syntax too).

    Returns
    -------
    list of Path
        The written files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(p for p in Path(src_dir).iterdir() if p.is_file()):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.SOPClassUID or ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = ds.StudyInstanceUID or deterministic_uid(key, "study")
        ds.SeriesInstanceUID = ds.SeriesInstanceUID or deterministic_uid(key, "series", ds.get("SeriesNumber", ""))
        out = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(out, enforce_file_format=True)
        written.append(out)
    return written
