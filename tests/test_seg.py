"""DICOM-SEG written for every source geometry, checked by independent tools.

dciodvfy validates the IOD, dcmqi's ``segimage2itkimage`` reads the SEG back
and its image must put every segment on the same patient-space voxels as
the mask we wrote, and highdicom reads the segment metadata back.
"""

from __future__ import annotations

import subprocess

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from medsegagent.dicom.seg import SegmentSpec, SegType, load_source_datasets, write_segmentation
from medsegagent.dicom.series import choose_series, read_series, scan_folder
from medsegagent.dicom.volume import LPS_TO_RAS
from medsegagent.models.registry import load_registry
from tests.conftest import dciodvfy_errors, tool

GEOMETRIES = [
    pytest.param({"orientation": "axial"}, id="axial"),
    pytest.param({"orientation": "sagittal"}, id="sagittal"),
    pytest.param({"orientation": "coronal"}, id="coronal"),
    pytest.param({"orientation": "oblique"}, id="oblique"),
    pytest.param({"orientation": "axial", "reverse_order": True}, id="reversed"),
    pytest.param({"orientation": "axial", "multiframe": True}, id="multiframe"),
]


def _specs() -> list[SegmentSpec]:
    dataset = load_registry().datasets["Demo_CT_Abdomen"]
    return [
        SegmentSpec(
            label.name,
            label.category.to_highdicom(),
            label.type.to_highdicom(),
            label.type_modifier.to_highdicom() if label.type_modifier else None,
            label.color,
        )
        for label in dataset.labels.values()
    ]


def _truth_labels(phantom) -> np.ndarray:
    # The demo label set counts the tumour (7) as liver (1).
    return np.where(phantom.labels == 7, 1, phantom.labels).astype(np.uint8)


def _write(phantom_factory, tmp_path, seg_type=SegType.BINARY, **kwargs):
    phantom, files = phantom_factory("CT", **kwargs)
    series = choose_series(scan_folder(files.dicom_dir))
    volume = read_series(series)
    # The reader must recover the phantom's grid whatever the file order or encoding.
    assert volume.geometry.same_grid(phantom.geometry)
    labels = _truth_labels(phantom)
    out = tmp_path / "seg.dcm"
    write_segmentation(
        volume, load_source_datasets(volume, series.files), labels, _specs(), out,
        uid_key=f"test/{kwargs}", request_text="liver, spleen, kidneys, pancreas, aorta", request_source="test",
        seg_type=seg_type,
    )  # fmt: skip
    return volume, labels, out


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_seg_valid_and_on_the_right_voxels(phantom_factory, tmp_path, geometry):
    volume, labels, seg_path = _write(phantom_factory, tmp_path, **geometry)
    assert dciodvfy_errors(seg_path) == []

    # dcmqi decodes each segment to its own image; every voxel it marks must be
    # a voxel of that segment on our grid, and it must mark all of them.
    outdir = tmp_path / "dcmqi"
    outdir.mkdir()
    subprocess.run(
        [tool("segimage2itkimage"), "--inputDICOM", str(seg_path), "--outputDirectory", str(outdir),
         "--outputType", "nifti"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    inverse = np.linalg.inv(volume.geometry.affine)
    for number in range(1, 7):
        image = nib.load(outdir / f"{number}.nii.gz")
        data = np.asarray(image.dataobj)
        ijk = np.argwhere(data > 0)
        lps = (LPS_TO_RAS @ image.affine @ np.c_[ijk, np.ones(len(ijk))].T).T
        col, row, sl = np.rint((inverse @ lps.T)[:3]).astype(int)
        assert (labels[sl, row, col] == number).all(), f"segment {number} has voxels off its mask"
        assert len(ijk) == int((labels == number).sum()), f"segment {number} lost voxels"


def test_highdicom_reads_back_segments(phantom_factory, tmp_path):
    volume, _, seg_path = _write(phantom_factory, tmp_path, orientation="coronal")
    seg = hd.seg.segread(seg_path)
    assert [d.segment_label for d in seg.SegmentSequence] == [s.label for s in _specs()]
    kidney_right = seg.SegmentSequence[2]
    assert kidney_right.segmented_property_type.value == "64033007"
    modifier = kidney_right.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert modifier.CodeMeaning == "Right"
    assert kidney_right.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_instance_uid
    ds = pydicom.dcmread(seg_path)
    assert ds.SeriesDescription.startswith("SEG liver")
    assert ds.ContentDescription.startswith("test: ")


def test_labelmap_seg_is_valid_and_readable(phantom_factory, tmp_path):
    _, _, seg_path = _write(phantom_factory, tmp_path, seg_type=SegType.LABELMAP, orientation="axial")
    assert dciodvfy_errors(seg_path) == []
    ds = pydicom.dcmread(seg_path)
    assert ds.SegmentationType == "LABELMAP"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless


def test_uids_are_deterministic(phantom_factory, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, _, first = _write(phantom_factory, tmp_path / "a", orientation="axial")
    _, _, second = _write(phantom_factory, tmp_path / "b", orientation="axial")
    a, b = pydicom.dcmread(first), pydicom.dcmread(second)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
