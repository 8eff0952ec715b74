"""Series reading: any order and orientation in, clear refusals for bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

from medsegagent.dicom.modality import mr_sequence, study_modality
from medsegagent.dicom.series import SeriesError, choose_series, read_series, scan_folder


def _copy(files, dest):
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, dest / f.name)
    return sorted(dest.glob("*.dcm"))


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "oblique"])
def test_reads_any_orientation_onto_the_phantom_grid(phantom_factory, orientation):
    phantom, files = phantom_factory("CT", orientation=orientation)
    volume = read_series(choose_series(scan_folder(files.dicom_dir)))
    assert volume.geometry.same_grid(phantom.geometry)
    image, _ = phantom.images["CT"]
    # Stored as integers with RescaleIntercept -1024: equal to the rounding step above the floor.
    representable = image > -1023
    assert np.abs(volume.array - image)[representable].max() <= 0.51
    assert volume.modality == "CT"
    assert len(volume.source_instances) == phantom.geometry.shape[0]


def test_reversed_instance_numbers_are_sorted_by_position(phantom_factory):
    phantom, files = phantom_factory("CT", reverse_order=True)
    volume = read_series(choose_series(scan_folder(files.dicom_dir)))
    assert volume.geometry.same_grid(phantom.geometry)
    first = pydicom.dcmread(files.dicom_dir / "CT_0001.dcm", stop_before_pixels=True)
    assert first.SOPInstanceUID == volume.source_instances[-1][1]


def test_multiframe_frames_are_referenced(phantom_factory):
    phantom, files = phantom_factory("CT", multiframe=True)
    volume = read_series(choose_series(scan_folder(files.dicom_dir)))
    assert volume.geometry.same_grid(phantom.geometry)
    assert sorted(frame for _, _, frame in volume.source_instances) == list(range(1, phantom.geometry.shape[0] + 1))


def test_missing_slice_is_refused(phantom_factory, tmp_path):
    _, files = phantom_factory("CT")
    copied = _copy(files.series["CT"], tmp_path / "gap")
    copied[10].unlink()
    with pytest.raises(SeriesError, match="missing"):
        read_series(choose_series(scan_folder(tmp_path / "gap")))


def test_gantry_tilt_is_refused(phantom_factory, tmp_path):
    _, files = phantom_factory("CT")
    copied = _copy(files.series["CT"], tmp_path / "tilt")
    for path in copied:
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.3 * z, z]  # shear: slices no longer along their normal
        ds.save_as(path)
    with pytest.raises(SeriesError, match="gantry tilt"):
        read_series(choose_series(scan_folder(tmp_path / "tilt")))


def test_no_dicom_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(SeriesError, match="no DICOM"):
        scan_folder(tmp_path)
    with pytest.raises(SeriesError, match="does not exist"):
        scan_folder(tmp_path / "nope")


def test_non_image_objects_are_not_volumes(phantom_factory, tmp_path):
    _, files = phantom_factory("CT")
    path = _copy(files.series["CT"][:1], tmp_path / "sr")[0]
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(path)
    with pytest.raises(SeriesError, match="no image series"):
        choose_series(scan_folder(tmp_path / "sr"))


def test_mixed_series_pick_the_largest_and_keep_them_apart(phantom_factory, tmp_path):
    _, ct = phantom_factory("CT")
    _, mr = phantom_factory("MR", slices=16)
    _copy(ct.series["CT"], tmp_path / "mixed" / "ct")
    _copy(mr.series["MR"], tmp_path / "mixed" / "mr")
    series = scan_folder(tmp_path / "mixed")
    assert len(series) == 2
    assert choose_series(series).modality == "CT"
    assert choose_series(series, "MR").modality == "MR"
    with pytest.raises(SeriesError, match="no PT image series"):
        choose_series(series, "PT")
    with pytest.raises(SeriesError, match="2 series"):
        read_series([p for s in series.values() for p in s.files])


def test_routing_modality_from_headers():
    assert mr_sequence({"SeriesDescription": "AX T2 HASTE"}) == "MR:T2"
    assert mr_sequence({"SeriesDescription": "T1 VIBE AX", "ContrastBolusAgent": "Gadovist"}) == "MR:T1C"
    assert mr_sequence({"SeriesDescription": "T1 MPRAGE POST GAD"}) == "MR:T1C"
    assert mr_sequence({"SeriesDescription": "ep2d_diff_b1000_ADC"}) == "MR:ADC"
    assert mr_sequence({"SeriesDescription": "AX FLAIR"}) == "MR:FLAIR"
    assert mr_sequence({"SeriesDescription": "localizer"}) == "MR"
    assert study_modality([{"Modality": "PT"}, {"Modality": "CT"}]) == "PT+CT"
    assert study_modality([{"Modality": "CT"}]) == "CT"
    assert study_modality([]) is None


def test_compressed_series_decodes_in_parallel_to_the_same_volume(phantom_factory, tmp_path):
    """RLE-compressed instances go through the decoding threads and give the uncompressed volume."""
    _, files = phantom_factory("CT", reverse_order=True)
    scanned = choose_series(scan_folder(files.dicom_dir))
    as_parsed = {id(ds): ds.get_item("PixelData", keep_deferred=True) for ds in scanned.headers.values()}
    plain = read_series(scanned)
    (tmp_path / "rle").mkdir()
    for path in files.dicom_dir.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.compress(pydicom.uid.RLELossless, generate_instance_uid=False)
        ds.save_as(tmp_path / "rle" / path.name)
    compressed = read_series(choose_series(scan_folder(tmp_path / "rle")))
    np.testing.assert_array_equal(compressed.array, plain.array)
    assert compressed.geometry.same_grid(plain.geometry)
    assert compressed.source_instances == plain.source_instances
    # The volume keeps the headers the scan parsed, and decoding left them as parsed (no pixel data loaded in).
    assert set(map(id, plain.source_headers)) == set(as_parsed)
    assert all(ds.get_item("PixelData", keep_deferred=True) is as_parsed[id(ds)] for ds in plain.source_headers)
