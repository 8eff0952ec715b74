"""DICOM-SEG written for every source geometry, checked by independent tools.

dciodvfy validates the IOD, dcmqi's ``segimage2itkimage`` reads every BINARY
and LABELMAP SEG back and its images must put every segment on exactly the
patient-space voxels of the mask we wrote (empty frames are omitted by the
writer, so dcmqi's images span fewer slices than the source: the comparison
goes through patient space, never through array indices), and highdicom
reads the segment metadata back.  Also here: provenance (IHE AIR), coding of
every registry label, validation errors, the preview PNG / Secondary
Capture, and the benchmark's ``--quick`` mode.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.sr.codedict import codes

from medsegagent.dicom import image_writer
from medsegagent.dicom.preview import preview_rgb, render_preview
from medsegagent.dicom.secondary_capture import PREVIEW_NOTE, patient_direction, write_preview_sc
from medsegagent.dicom.seg import (
    EMPTY_SEGMENT_NOTE,
    IHE_PROCESSING_ALGORITHM,
    AlgorithmInfo,
    ContributingModel,
    SegmentMember,
    SegmentSpec,
    SegType,
    device_uid,
    members_from_ranks,
    model_fingerprint,
    save_atomically,
    segment_description,
    segment_label,
    write_segmentation,
)
from medsegagent.dicom.streamwrite import write_multiframe
from medsegagent.dicom.uids import derived_uid
from medsegagent.dicom.volume import LPS_TO_RAS, Geometry
from medsegagent.models.registry import load_registry
from medsegagent.node.pipeline import segment_spec
from tests.conftest import dciodvfy_errors, tool

GEOMETRIES = [
    pytest.param({"orientation": "axial"}, id="axial"),
    pytest.param({"orientation": "sagittal"}, id="sagittal"),
    pytest.param({"orientation": "coronal"}, id="coronal"),
    pytest.param({"orientation": "oblique"}, id="oblique"),
    pytest.param({"orientation": "axial", "reverse_order": True}, id="reversed"),
    pytest.param({"orientation": "axial", "multiframe": True}, id="enhanced-ct"),
    pytest.param({"modality": "MR", "orientation": "axial"}, id="mr"),
    pytest.param({"modality": "MR", "orientation": "coronal", "multiframe": True}, id="mr-multiframe"),
]

LABEL_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"


def dcmqi_labels(seg_path: Path, geometry: Geometry, outdir: Path) -> np.ndarray:
    """Decode ``seg_path`` with dcmqi and put its segments on ``geometry`` (segment numbers by label).

    Every voxel dcmqi marks must land exactly on a voxel centre of our grid
    (same geometry, not just the same rounding), and no voxel may get two
    segments.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [tool("segimage2itkimage"), "--inputDICOM", str(seg_path), "--outputDirectory", str(outdir),
         "--outputType", "nifti"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    meta = json.loads((outdir / "meta.json").read_text())
    numbers = {str(item.SegmentLabel): int(item.SegmentNumber) for item in pydicom.dcmread(seg_path).SegmentSequence}
    decoded = np.zeros(geometry.shape, np.uint8)
    inverse = np.linalg.inv(geometry.affine)
    for file_number, attributes in enumerate(meta["segmentAttributes"], start=1):
        image = nib.load(outdir / f"{file_number}.nii.gz")
        data = np.asarray(image.dataobj)
        for attribute in attributes:
            ijk = np.argwhere(data == attribute["labelID"])
            if not len(ijk):
                continue
            lps = (LPS_TO_RAS @ image.affine @ np.c_[ijk, np.ones(len(ijk))].T).T
            index = (inverse @ lps.T)[:3]
            assert np.abs(index - np.rint(index)).max() < 1e-3, "dcmqi's voxels are off our grid"
            col, row, sl = np.rint(index).astype(int)
            assert not decoded[sl, row, col].any(), "two segments on one voxel"
            decoded[sl, row, col] = numbers[attribute["SegmentLabel"]]
    return decoded


def _geometry_args(geometry: dict) -> tuple[str, dict]:
    geometry = dict(geometry)
    return geometry.pop("modality", "CT"), geometry


@pytest.mark.parametrize("seg_type", list(SegType), ids=lambda t: t.value.lower())
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_seg_valid_and_on_the_right_voxels(seg_factory, tmp_path, geometry, seg_type):
    modality, geometry = _geometry_args(geometry)
    written = seg_factory(tmp_path, seg_type, modality=modality, **geometry)
    assert dciodvfy_errors(written.path) == []
    if seg_type is not SegType.FRACTIONAL:
        decoded = dcmqi_labels(written.path, written.volume.geometry, tmp_path / "dcmqi")
        assert np.array_equal(decoded, written.labels), "dcmqi's masks differ from ours"

    # highdicom reads back the same segment metadata, and the same voxels.
    seg = hd.seg.segread(written.path)
    assert seg.SegmentationType == seg_type.value
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == written.volume.series_instance_uid
    described = [d for d in seg.SegmentSequence if d.segment_number > 0]
    assert [d.segment_label for d in described] == [s.label for s in written.specs]
    for description, spec in zip(described, written.specs, strict=True):
        assert description.segmented_property_category == spec.category
        assert description.segmented_property_type == spec.type
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = description.algorithm_identification[0]
        assert algorithm.AlgorithmName == "MedSegAgent rank-aware ensemble"
        assert "models=demo_ct_abdomen:rank1:w0.70;other_model:rank2:w0.30" in algorithm.AlgorithmParameters
        assert description.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT"
    pixels = seg.get_volume(segment_numbers=list(range(1, 7)), allow_missing_positions=True).array
    counts = [int(np.count_nonzero(pixels[..., n - 1])) for n in range(1, 7)]
    assert counts == [int((written.labels == n).sum()) for n in range(1, 7)]


@pytest.mark.parametrize("seg_type", [SegType.BINARY, SegType.LABELMAP], ids=["binary", "labelmap"])
def test_empty_segment_is_described_and_readable(seg_factory, tmp_path, seg_type):
    written = seg_factory(tmp_path, seg_type, orientation="sagittal", empty=("spleen",))
    assert not (written.labels == 2).any()
    assert dciodvfy_errors(written.path) == []
    ds = pydicom.dcmread(written.path)
    spleen = next(item for item in ds.SegmentSequence if item.SegmentNumber == 2)
    assert spleen.SegmentLabel == "Spleen"
    assert spleen.SegmentDescription == EMPTY_SEGMENT_NOTE
    others = [item for item in ds.SegmentSequence if item.SegmentNumber not in (0, 2)]
    assert all("SegmentDescription" not in item for item in others)
    decoded = dcmqi_labels(written.path, written.volume.geometry, tmp_path / "dcmqi")
    assert np.array_equal(decoded, written.labels)


def test_all_segments_empty_still_writes_a_valid_seg(seg_factory, tmp_path):
    names = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas", "aorta")
    written = seg_factory(tmp_path, SegType.BINARY, orientation="axial", empty=names)
    assert dciodvfy_errors(written.path) == []
    ds = pydicom.dcmread(written.path)
    assert [item.SegmentDescription for item in ds.SegmentSequence] == [EMPTY_SEGMENT_NOTE] * len(names)


def test_provenance_ihe_air_item_and_device_uid(seg_factory, tmp_path):
    written = seg_factory(tmp_path / "a", orientation="coronal")
    ds = pydicom.dcmread(written.path)
    assert ds.Manufacturer == "MedSegAgent"
    assert ds.ManufacturerModelName == "MedSegAgent node"
    assert ds.ContentCreatorName == ""
    items = [
        item
        for item in ds.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
    ]
    assert len(items) == 1
    air = items[0]
    purpose = air.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodeMeaning) == ("Newcode1", "Processing Algorithm")
    assert hd.sr.CodedConcept.from_dataset(purpose) == IHE_PROCESSING_ALGORITHM
    assert air.Manufacturer == "MedSegAgent"
    assert air.ManufacturerModelName.startswith("MedSegAgent rank-aware ensemble")
    versions = list(air.SoftwareVersions)
    assert "demo_ct_abdomen sha256:00112233aabbccdd" in versions
    assert "other_model 1.2.0" in versions
    assert air.DeviceUID == ds.DeviceUID
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99IHE"
    # The acquisition equipment of the source is kept as well (highdicom adds it).
    purposes = {item.PurposeOfReferenceCodeSequence[0].CodeValue for item in ds.ContributingEquipmentSequence}
    assert {"109101", "Newcode1"} <= purposes

    # Same models (any order) -> same Device UID; a changed weight digest -> a new one.
    same = seg_factory(tmp_path / "b", orientation="coronal", models=list(reversed(written_models())))
    assert pydicom.dcmread(same.path).DeviceUID == ds.DeviceUID
    retrained = seg_factory(
        tmp_path / "c",
        orientation="coronal",
        models=[("demo_ct_abdomen", "sha256:ffffffffffffffff"), ("other_model", "1.2.0")],
    )
    assert pydicom.dcmread(retrained.path).DeviceUID != ds.DeviceUID


def written_models() -> list[tuple[str, str]]:
    return [("demo_ct_abdomen", "sha256:00112233aabbccdd"), ("other_model", "1.2.0")]


def test_device_uid_is_order_independent_and_model_sensitive():
    a = [ContributingModel("m1", "1"), ContributingModel("m2", "2")]
    assert device_uid(a) == device_uid(list(reversed(a)))
    assert device_uid(a) != device_uid([ContributingModel("m1", "1"), ContributingModel("m2", "3")])
    assert device_uid(a) != device_uid(a, AlgorithmInfo(version="9.9"))


def test_members_from_ensemble_ranks():
    members = members_from_ranks({"b": 2, "a": 1, "c": 3}, {"a": 0.7, "b": 0.3})
    assert [m.encode() for m in members] == ["a:rank1:w0.70", "b:rank2:w0.30", "c:rank3:dropped"]


def test_model_fingerprint_follows_the_weights(tmp_path):
    weights = tmp_path / "model" / "models" / "model.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"a" * 1000)
    first = model_fingerprint(tmp_path / "model")
    assert first.startswith("sha256:") and len(first) <= 64
    assert model_fingerprint(tmp_path / "model") == first
    weights.write_bytes(b"b" * 1001)
    assert model_fingerprint(tmp_path / "model") != first
    assert model_fingerprint(weights) != first
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path / "missing")


def test_series_and_content_description_carry_the_request(seg_factory, tmp_path):
    written = seg_factory(tmp_path, orientation="axial")
    ds = pydicom.dcmread(written.path)
    assert ds.SeriesDescription.startswith("SEG liver")
    assert ds.ContentDescription.startswith("test: liver")
    assert len(ds.SeriesDescription) <= 64 and len(ds.ContentDescription) <= 64
    long_text = "segment " + ", ".join(["the liver and both kidneys"] * 10)
    out = tmp_path / "long.dcm"
    ds = write_segmentation(
        written.volume, written.sources, written.labels, written.specs, out, uid_key="long",
        request_text=long_text, request_source="worklist",
    )  # fmt: skip
    assert len(ds.SeriesDescription) == 64 and ds.SeriesDescription.endswith("...")
    assert ds.ContentDescription.startswith("worklist: segment the liver")
    assert dciodvfy_errors(out) == []


def test_uids_are_deterministic_per_job_series_and_kind(seg_factory, tmp_path):
    a = seg_factory(tmp_path / "a", orientation="axial", uid_key="job-1").dataset
    b = seg_factory(tmp_path / "b", orientation="axial", uid_key="job-1").dataset
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    labelmap = seg_factory(tmp_path / "c", SegType.LABELMAP, orientation="axial", uid_key="job-1").dataset
    assert labelmap.SOPInstanceUID != a.SOPInstanceUID
    other_job = seg_factory(tmp_path / "d", orientation="axial", uid_key="job-2").dataset
    assert other_job.SOPInstanceUID != a.SOPInstanceUID
    other_series = seg_factory(tmp_path / "e", orientation="sagittal", uid_key="job-1").dataset
    assert other_series.SeriesInstanceUID != a.SeriesInstanceUID


def test_fractional_keeps_probabilities(seg_factory, tmp_path):
    written = seg_factory(tmp_path, orientation="axial")
    stack = np.stack([(written.labels == n).astype(np.float32) * 0.8 for n in range(1, 7)])
    out = tmp_path / "fractional.dcm"
    write_segmentation(
        written.volume, written.sources, stack, written.specs, out, uid_key="p", seg_type=SegType.FRACTIONAL
    )
    assert dciodvfy_errors(out) == []
    seg = hd.seg.segread(out)
    volume = seg.get_volume(segment_numbers=[1], rescale_fractional=True, allow_missing_positions=True)
    assert np.isclose(volume.array.max(), 0.8, atol=1 / 255)


def test_invalid_inputs_are_refused_clearly(seg_factory, phantom_factory, tmp_path):
    written = seg_factory(tmp_path, orientation="axial")
    volume, sources, labels, specs = written.volume, written.sources, written.labels, written.specs

    def write(masks=labels, segs=specs, srcs=sources, **kwargs):
        return write_segmentation(volume, srcs, masks, segs, tmp_path / "x.dcm", uid_key="bad", **kwargs)

    with pytest.raises(ValueError, match="at least one segment"):
        write(segs=[])
    with pytest.raises(ValueError, match="does not match the volume"):
        write(masks=labels[:-1])
    with pytest.raises(ValueError, match=r"values must be 0\.\.5"):
        write(segs=specs[:5])
    with pytest.raises(ValueError, match="threshold"):
        write(masks=np.stack([(labels == n) * 0.5 for n in range(1, 7)]))
    overlapping = np.stack([labels > 0] + [labels == n for n in range(2, 7)])
    with pytest.raises(ValueError, match="overlap"):
        write(masks=overlapping, seg_type=SegType.LABELMAP)
    with pytest.raises(ValueError, match="one SEG per source series"):
        _, mr_files = phantom_factory("MR")
        write(srcs=[pydicom.dcmread(mr_files.series["MR"][0], stop_before_pixels=True)])
    with pytest.raises(ValueError, match="missing from source_datasets"):
        write(srcs=sources[:-1])
    with pytest.raises(TypeError, match="name, version"):
        write(models=["just-a-name"])
    with pytest.raises(ValueError, match="must not be empty"):
        ContributingModel("model", "")
    with pytest.raises(ValueError, match="backslash"):
        ContributingModel("a\\b", "1")
    with pytest.raises(ValueError, match="rank"):
        SegmentMember("m", 0)
    with pytest.raises(ValueError, match=r"0\.\.255"):
        SegmentSpec("x", specs[0].category, specs[0].type, color=(0, 0, 300))
    with pytest.raises(ValueError, match="64"):
        AlgorithmInfo(name="x" * 65)


def test_every_registry_label_codes_into_a_segment_description():
    """All labels of all datasets: category from CID 7150, type from the SNOMED CT table, valid SEG items."""
    from pydicom.sr._concepts_dict import concepts

    sct = {value for entries in concepts["SCT"].values() for value in entries}
    cid7150 = {(code.scheme_designator, code.value) for code in codes.cid7150.concepts.values()}
    registry = load_registry()
    count = 0
    for dataset in registry:
        for number, label in enumerate(dataset.labels.values(), start=1):
            spec = segment_spec(label)
            description = segment_description(number, spec, AlgorithmInfo(), f"coding/{dataset.name}")
            where = f"{dataset.name}/{label.name}"
            category = description.SegmentedPropertyCategoryCodeSequence[0]
            assert (category.CodingSchemeDesignator, category.CodeValue) in cid7150, where
            type_item = description.SegmentedPropertyTypeCodeSequence[0]
            assert type_item.CodingSchemeDesignator == "SCT" and type_item.CodeValue in sct, where
            assert 0 < len(type_item.CodeMeaning) <= 64, where
            if label.type_modifier is not None:
                modifier = type_item.SegmentedPropertyTypeModifierCodeSequence[0]
                assert modifier.CodeValue in {"7771000", "24028007", "51440002"}, where
            assert len(description.RecommendedDisplayCIELabValue) == 3, where
            count += 1
    assert len([d for d in registry.in_collection("medsegagent-23")]) == 23
    assert count >= 23


def test_patient_direction_letters():
    assert patient_direction(np.array([1.0, 0, 0])) == "L"
    assert patient_direction(np.array([-1.0, 0, 0])) == "R"
    assert patient_direction(np.array([0, 0, -1.0])) == "F"
    assert patient_direction(np.array([0.8, 0.6, 0])) == "LP"


@pytest.mark.parametrize(
    "geometry",
    [GEOMETRIES[0], GEOMETRIES[1], GEOMETRIES[3], GEOMETRIES[5], GEOMETRIES[6]],
    ids=["axial", "sagittal", "oblique", "enhanced-ct", "mr"],
)
def test_preview_secondary_capture(seg_factory, tmp_path, geometry):
    modality, geometry = _geometry_args(geometry)
    written = seg_factory(tmp_path, modality=modality, **geometry)
    colors = [s.color for s in written.specs]
    out = tmp_path / "sc.dcm"
    sc = write_preview_sc(
        written.volume, written.sources, written.labels, colors, out, uid_key="job", request_text="liver"
    )
    assert dciodvfy_errors(out) == []
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    assert ds.StudyInstanceUID == written.sources[0].StudyInstanceUID
    assert ds.DerivationDescription == PREVIEW_NOTE
    shown = preview_rgb(written.volume.array, written.labels, colors, modality=written.volume.modality)
    _, sop_uid, frame = written.volume.source_instances[shown.slice_index]
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == sop_uid
    assert ds.SourceImageSequence[0].get("ReferencedFrameNumber") == frame
    assert np.array_equal(ds.pixel_array, shown.rgb)
    assert sc.SeriesInstanceUID != written.dataset.SeriesInstanceUID
    row, column = written.volume.geometry.row_direction, written.volume.geometry.column_direction
    assert list(ds.PatientOrientation) == [patient_direction(row), patient_direction(column)]
    if geometry["orientation"] == "sagittal":
        assert ds.PatientOrientation[0] in {"P", "A"}
    if geometry["orientation"] == "oblique":
        assert len(ds.PatientOrientation[0]) > 1


def test_render_preview_png(seg_factory, tmp_path):
    written = seg_factory(tmp_path, orientation="axial")
    colors = [s.color for s in written.specs]
    index = render_preview(written.volume.array, written.labels, colors, tmp_path / "p.png")
    areas = (written.labels > 0).reshape(written.labels.shape[0], -1).sum(axis=1)
    assert index == int(np.argmax(areas))
    picture = Image.open(tmp_path / "p.png")
    assert picture.mode == "RGB" and max(picture.size) >= 512
    with pytest.raises(ValueError, match="no colour"):
        preview_rgb(written.volume.array, written.labels, colors[:2])


def test_benchmark_quick_writes_its_table(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_seg.py"
    out = tmp_path / "seg.md"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = out.read_text()
    for row in ("BINARY", "LABELMAP", "FRACTIONAL", "dcmqi"):
        assert row in table
    assert "| type |" in proc.stdout

    # --stage adds the write-stage section (before / after the streamed writer) and keeps the table above.
    proc = subprocess.run(
        [sys.executable, str(script), "--stage", "--quick", "--runs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = out.read_text()
    assert report.startswith(table.rstrip()) and report.count("## Write stage") == 1
    stage = report.split("## Write stage")[1]
    for row in ("| SEG (BINARY) |", "| SR |", "| preview SC |", "| preview PNG |", "| peak allocated, SEG file write"):
        assert row in stage


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("kidney_right", "Kidney, right"),
        ("liver", "Liver"),
        ("vertebrae_L1", "Vertebra L1"),
        ("rib_left_3", "Rib 3, left"),
        ("Hippocampus_L", "Hippocampus, left"),
        ("lower_left_canine_fdi33", "Lower left canine fdi33"),  # a side inside the name stays where it is
        ("GTVp", "GTVp"),
    ],
)
def test_segment_labels_read_as_a_radiologist_writes_them(name, label):
    assert segment_label(name) == label


def test_result_uids_follow_the_one_derived_scheme_and_series_differ_by_type(seg_factory, tmp_path):
    binary = pydicom.dcmread(seg_factory(tmp_path / "b", SegType.BINARY, uid_key="job-1").path)
    labelmap = pydicom.dcmread(seg_factory(tmp_path / "l", SegType.LABELMAP, uid_key="job-1").path)
    for ds in (binary, labelmap):
        assert ds.SeriesInstanceUID.startswith("2.25.") and ds.SOPInstanceUID.startswith("2.25.")
    assert binary.SeriesInstanceUID == derived_uid(f"job-1|{binary.ReferencedSeriesSequence[0].SeriesInstanceUID}",
                                                   "seg-series", "BINARY")  # fmt: skip
    # Two encodings of one result are two series (each with its own Series Number in the node).
    assert binary.SeriesInstanceUID != labelmap.SeriesInstanceUID
    assert image_writer.deterministic_uid is derived_uid  # the phantoms' UIDs come from the same scheme


@pytest.mark.parametrize("seg_type", list(SegType), ids=lambda t: t.value.lower())
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[5]])
def test_seg_file_is_byte_for_byte_what_pydicom_writes(seg_factory, tmp_path, geometry, seg_type, monkeypatch):
    # write_segmentation streams the SEG (functional group items encoded once each, pixel data
    # not copied); pydicom's own writer, run afterwards on the same dataset, must give the same bytes.
    modality, geometry = _geometry_args(geometry)

    save_as = pydicom.Dataset.save_as

    def no_fallback(self, *args, **kwargs):  # a silent fallback to save_as would match byte for byte too
        if str(self.get("Modality", "")) == "SEG":
            raise AssertionError("the SEG was not streamed: write_multiframe fell back to save_as")
        return save_as(self, *args, **kwargs)  # the phantom's source images

    with monkeypatch.context() as patched:
        patched.setattr(pydicom.Dataset, "save_as", no_fallback)
        written = seg_factory(tmp_path, seg_type, modality=modality, **geometry)
    reference = tmp_path / "pydicom.dcm"
    written.dataset.save_as(reference, enforce_file_format=True)
    assert len(written.dataset.PerFrameFunctionalGroupsSequence) > 1
    assert written.path.read_bytes() == reference.read_bytes()


def test_stream_writer_leaves_other_datasets_to_pydicom(seg_factory, tmp_path):
    written = seg_factory(tmp_path, SegType.BINARY)
    # Implicit VR is not streamed: the file is pydicom's, and still the same data set.
    seg = pydicom.dcmread(written.path)
    seg.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    write_multiframe(seg, tmp_path / "implicit.dcm")
    seg.save_as(tmp_path / "reference.dcm", enforce_file_format=True)
    assert (tmp_path / "implicit.dcm").read_bytes() == (tmp_path / "reference.dcm").read_bytes()
    # No per-frame functional groups (a single-frame object): pydicom's file too.
    del seg.PerFrameFunctionalGroupsSequence
    write_multiframe(seg, tmp_path / "no-groups.dcm")
    assert pydicom.dcmread(tmp_path / "no-groups.dcm").SOPInstanceUID == seg.SOPInstanceUID


def test_a_failed_write_leaves_no_file(seg_factory, tmp_path):
    written = seg_factory(tmp_path, SegType.BINARY)

    def failing(dataset, path):
        path.write_bytes(b"half a SEG")
        raise OSError("disk full")

    out = tmp_path / "out" / "seg.dcm"
    with pytest.raises(OSError, match="disk full"):
        save_atomically(written.dataset, out, write=failing)
    assert list(out.parent.iterdir()) == []  # neither the SEG nor its partial file
