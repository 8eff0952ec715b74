"""TID 1500 measurement report (segment volumes) referencing the SEG: dciodvfy and highdicom readback."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest

from medsegagent.dicom.seg import SegType
from medsegagent.dicom.sr import read_volumes_ml, segment_volumes_ml, write_volume_report
from tests.conftest import dciodvfy_errors
from tests.test_seg import GEOMETRIES as SEG_GEOMETRIES

# The SEG suite's geometries; SR tests skip the multi-frame MR source, which adds nothing for a volume report.
GEOMETRIES = [param for param in SEG_GEOMETRIES if param.id != "mr-multiframe"]


def _write(seg_factory, tmp_path, seg_type=SegType.BINARY, empty=(), **geometry):
    modality = geometry.pop("modality", "CT")
    written = seg_factory(tmp_path, seg_type, modality=modality, empty=empty, **geometry)
    volumes = segment_volumes_ml(written.labels, len(written.specs), written.volume.geometry.voxel_volume_ml)
    out = tmp_path / "sr.dcm"
    write_volume_report(written.dataset, volumes, out, "job-1", request_text="liver and kidneys")
    return written, volumes, out


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_volume_report_valid_and_read_back(seg_factory, tmp_path, geometry):
    written, volumes, out = _write(seg_factory, tmp_path, **geometry)
    assert dciodvfy_errors(out) == []
    back = read_volumes_ml(out)
    assert sorted(back) == list(range(1, 7))
    for number, (label, value, unit) in back.items():
        assert label == written.specs[number - 1].label
        assert unit == "ml"
        assert value == pytest.approx(volumes[number], abs=1e-3)
    # Procedure Reported (121058, DCM) follows the source modality (CID 100).
    expected = "MRI unspecified body region" if written.volume.modality == "MR" else "CT unspecified body region"
    ds = pydicom.dcmread(out)
    procedures = [
        item.ConceptCodeSequence[0].CodeMeaning
        for item in ds.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"
    ]
    assert procedures == [expected]


def test_report_references_the_seg_segments(seg_factory, tmp_path):
    written, _, out = _write(seg_factory, tmp_path, orientation="coronal", empty=("spleen",))
    sr = hd.sr.srread(out)
    seg = written.dataset
    assert sr.StudyInstanceUID == seg.StudyInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == seg.SeriesInstanceUID
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    tracking = {int(item.SegmentNumber): str(item.TrackingUID) for item in seg.SegmentSequence}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 6
    for group in groups:
        reference = group.referenced_segment
        number = int(reference.referenced_segment_numbers[0])
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_sop_class_uid == seg.SOPClassUID
        assert reference.source_series_for_segmentation.value == written.volume.series_instance_uid
        assert group.tracking_uid == tracking[number]
        assert group.finding_type == written.specs[number - 1].type
    spleen = next(g for g in groups if int(g.referenced_segment.referenced_segment_numbers[0]) == 2)
    assert spleen.get_measurements()[0].value == 0.0
    # Laterality of the kidneys travels as a finding site.
    right_kidney = next(g for g in groups if int(g.referenced_segment.referenced_segment_numbers[0]) == 3)
    site = right_kidney.finding_sites[0]
    assert site.value == written.specs[2].type
    assert site.laterality.CodeMeaning == "Right"
    ds = pydicom.dcmread(out)
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
    assert ds.SeriesDescription.startswith("Volumes liver")


def test_observer_is_the_seg_device(seg_factory, tmp_path):
    written, _, out = _write(seg_factory, tmp_path, orientation="axial")
    sr = hd.sr.srread(out)
    uids = [
        item.UID
        for item in sr.ContentSequence
        if item.ValueType == "UIDREF" and item.ConceptNameCodeSequence[0].CodeValue == "121012"
    ]
    assert uids == [written.dataset.DeviceUID]


def test_report_uids_are_deterministic(seg_factory, tmp_path):
    written, volumes, first = _write(seg_factory, tmp_path / "a", orientation="axial")
    second = tmp_path / "b.dcm"
    write_volume_report(written.dataset, volumes, second, "job-1")
    a, b = pydicom.dcmread(first), pydicom.dcmread(second)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    third = tmp_path / "c.dcm"
    write_volume_report(written.dataset, volumes, third, "job-2")
    assert pydicom.dcmread(third).SOPInstanceUID != a.SOPInstanceUID


def test_report_refuses_a_labelmap_seg(seg_factory, tmp_path):
    # dciodvfy rejects Referenced Segment Number into a Label Map SEG: report against the BINARY SEG.
    written = seg_factory(tmp_path, SegType.LABELMAP, orientation="axial")
    volumes = segment_volumes_ml(written.labels, 6, written.volume.geometry.voxel_volume_ml)
    with pytest.raises(ValueError, match="BINARY or FRACTIONAL"):
        write_volume_report(written.dataset, volumes, tmp_path / "sr.dcm", "job-1")


def test_report_on_a_fractional_seg(seg_factory, tmp_path):
    _, _, out = _write(seg_factory, tmp_path, SegType.FRACTIONAL, orientation="axial")
    assert dciodvfy_errors(out) == []
    assert sorted(read_volumes_ml(out)) == list(range(1, 7))


def test_invalid_reports_are_refused(seg_factory, tmp_path):
    written = seg_factory(tmp_path, orientation="axial")
    volumes = segment_volumes_ml(written.labels, 6, written.volume.geometry.voxel_volume_ml)
    with pytest.raises(ValueError, match="missing \\[6\\]"):
        write_volume_report(written.dataset, {k: v for k, v in volumes.items() if k != 6}, tmp_path / "x", "k")
    with pytest.raises(ValueError, match="not in the SEG \\[7\\]"):
        write_volume_report(written.dataset, {**volumes, 7: 1.0}, tmp_path / "x", "k")
    with pytest.raises(ValueError, match="finite"):
        write_volume_report(written.dataset, {**volumes, 1: -1.0}, tmp_path / "x", "k")
    with pytest.raises(ValueError, match="not a DICOM Segmentation"):
        write_volume_report(written.sources[0], volumes, tmp_path / "x", "k")
    with pytest.raises(ValueError, match="voxel volume"):
        segment_volumes_ml(written.labels, 6, 0.0)


def test_segment_volumes_from_stack_and_label_map():
    labels = np.zeros((2, 3, 3), np.uint8)
    labels[0, 0, :2] = 1
    labels[1, 1, 1] = 3
    stack = np.stack([labels == n for n in (1, 2, 3)])
    expected = {1: 1.0, 2: 0.0, 3: 0.5}
    assert segment_volumes_ml(labels, 3, 0.5) == expected
    assert segment_volumes_ml(stack, 3, 0.5) == expected
