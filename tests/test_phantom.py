"""Synthetic phantom patients: anatomy, determinism, DICOM conformance, truth geometry."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy.ndimage import distance_transform_edt

from medsegagent.dicom.image_writer import (
    ENHANCED_CT_IMAGE_STORAGE,
    PhantomFiles,
    StudyInfo,
    deterministic_uid,
    write_phantom,
    write_series,
)
from medsegagent.dicom.phantom import (
    PHANTOM_LABELS,
    SUV_BQML,
    Phantom,
    make_phantom,
    phantom_geometry,
)
from medsegagent.dicom.volume import LPS_TO_RAS

DCIODVFY = shutil.which("dciodvfy")
SMALL = {"slices": 24, "size": 64}


def _dciodvfy_errors(path: Path) -> list[str]:
    """Lines of dciodvfy output that report errors (it writes them to stderr)."""
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stderr + proc.stdout).splitlines() if "Error" in line]


def _frames(files: list[Path]) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-file (or per-frame) ImagePositionPatient in file/frame order, and real-world pixel values."""
    if len(files) == 1 and "PerFrameFunctionalGroupsSequence" in pydicom.dcmread(files[0], stop_before_pixels=True):
        ds = pydicom.dcmread(files[0])
        shared = ds.SharedFunctionalGroupsSequence[0]
        positions, values = [], []
        pixels = ds.pixel_array
        for i, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
            positions.append(np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float))
            pvt = frame.get("PixelValueTransformationSequence") or shared.get("PixelValueTransformationSequence")
            slope, intercept = (float(pvt[0].RescaleSlope), float(pvt[0].RescaleIntercept)) if pvt else (1.0, 0.0)
            values.append(pixels[i] * slope + intercept)
        return positions, np.stack(values)
    datasets = sorted((pydicom.dcmread(f) for f in files), key=lambda d: int(d.InstanceNumber))
    positions = [np.array(d.ImagePositionPatient, float) for d in datasets]
    values = [d.pixel_array * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0)) for d in datasets]
    return positions, np.stack(values)


# -- model -------------------------------------------------------------------------


def test_same_seed_same_phantom_other_seed_differs() -> None:
    a = make_phantom("PT+CT", seed=5, **SMALL)
    b = make_phantom("PT+CT", seed=5, **SMALL)
    c = make_phantom("PT+CT", seed=6, **SMALL)
    assert set(a.images) == {"PT", "CT"}
    for m in a.images:
        assert a.images[m][0].dtype == np.float32
        np.testing.assert_array_equal(a.images[m][0], b.images[m][0])
        assert a.images[m][1].same_grid(a.geometry)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.labels.dtype == np.uint8 and a.labels.shape == a.geometry.shape == (24, 64, 64)
    assert not np.array_equal(a.labels, c.labels)
    assert a.label_names == PHANTOM_LABELS


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_organ_volumes_are_realistic(seed: int) -> None:
    p = make_phantom("CT", seed=seed, slices=48, size=96)
    v = p.volumes_ml()
    assert 1200 <= v["liver"] + v["liver_tumour"] <= 1800
    assert 150 <= v["spleen"] <= 250
    assert 130 <= v["kidney_right"] <= 180 and 130 <= v["kidney_left"] <= 180
    assert 60 <= v["pancreas"] <= 90
    tumour = p.anatomy.organs["liver_tumour"]
    assert 20.0 <= 2 * tumour.radius <= 40.0
    assert 18.0 <= 2 * p.anatomy.organs["aorta"].axes[0] <= 24.0
    # The tumour lies inside the liver: every tumour voxel is inside the liver's analytic shape.
    centres = p.geometry.voxel_centres()[p.labels == 7]
    assert len(centres) > 0 and p.anatomy.organs["liver"].contains(centres).all()
    # Pancreas at least ~20 mm thick somewhere along its length (so tiny networks can learn it).
    edt = distance_transform_edt(p.labels == 5, sampling=p.geometry.spacing)
    assert edt.max() >= 10.0


def test_anatomy_is_where_anatomy_belongs() -> None:
    p = make_phantom("CT", seed=0, slices=32, size=64)
    centres = p.geometry.voxel_centres()
    mean = {name: centres[p.labels == v].mean(axis=0) for v, name in PHANTOM_LABELS.items()}
    assert mean["liver"][0] < 0 < mean["spleen"][0]  # LPS: patient's right is -x
    assert mean["kidney_right"][0] < 0 < mean["kidney_left"][0]
    assert mean["kidney_left"][1] > mean["pancreas"][1]  # kidneys posterior to the pancreas
    assert mean["aorta"][1] > mean["pancreas"][1]  # aorta behind the pancreas
    # Intensities: CT organs are distinct; PET tumour is hot.
    ct = p.images["CT"][0]
    assert abs(float(ct[p.labels == 1].mean()) - 110) < 15
    assert float(ct[p.labels == 7].mean()) < float(ct[p.labels == 1].mean()) - 30
    pt = make_phantom("PT+CT", seed=0, slices=32, size=64)
    suv = pt.images["PT"][0] / SUV_BQML
    assert 1.5 < float(suv[pt.labels == 1].mean()) < 3.0
    assert float(suv[pt.labels == 7].max()) > 4.0


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "oblique"])
def test_grid_orientation_and_coverage(orientation: str) -> None:
    g = phantom_geometry(orientation, slices=20, size=50)
    assert np.allclose(g.slice_direction, g.normal)
    expected = {
        "axial": ([1, 0, 0], [0, 1, 0]),
        "coronal": ([1, 0, 0], [0, 0, -1]),
        "sagittal": ([0, 1, 0], [0, 0, -1]),
    }
    if orientation in expected:
        assert np.allclose(g.row_direction, expected[orientation][0])
        assert np.allclose(g.column_direction, expected[orientation][1])
    else:
        tilt = np.degrees(np.arccos(abs(g.normal[2])))
        assert 15 < tilt < 30
    # Every organ voxel of a phantom on this grid is away from the grid border (box covered).
    p = make_phantom("CT", seed=1, slices=20, size=50, orientation=orientation)
    assert set(np.unique(p.labels)) >= {1, 2, 3, 4, 5}
    organ = np.argwhere(np.isin(p.labels, [1, 2, 3, 4, 5]))
    assert organ.min(axis=0)[1:].min() > 0 and (organ.max(axis=0)[1:] < 49).all()


# -- DICOM -------------------------------------------------------------------------

CASES = [
    # modality, orientation, reverse_order, multiframe
    ("CT", "axial", False, False),
    ("CT", "sagittal", True, False),
    ("CT", "coronal", False, False),
    ("MR", "oblique", True, False),
    ("PT+CT", "axial", False, False),
    ("CT", "axial", False, True),
    ("CT", "oblique", True, True),
    ("MR", "coronal", False, True),
    ("PT+CT", "sagittal", True, True),
]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, tuple[Phantom, PhantomFiles]]:
    out = {}
    for case in CASES:
        modality, orientation, reverse, multiframe = case
        p = make_phantom(modality, seed=11, slices=12, size=32, orientation=orientation)
        root = tmp_path_factory.mktemp("phantom")
        out[case] = (p, write_phantom(p, root, reverse_order=reverse, multiframe=multiframe))
    return out


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_dciodvfy_reports_no_errors(case: tuple, written: dict) -> None:
    _, files = written[case]
    for modality, paths in files.series.items():
        checked = paths if len(paths) <= 3 else [paths[0], paths[len(paths) // 2], paths[-1]]
        for path in checked:
            assert _dciodvfy_errors(path) == [], f"{modality} {path.name}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_positions_order_and_values_round_trip(case: tuple, written: dict) -> None:
    phantom, files = written[case]
    _, _, reverse, multiframe = case
    for modality, paths in files.series.items():
        image, g = phantom.images[modality]
        n = g.shape[0]
        assert len(paths) == (1 if multiframe else n)
        assert [p.name for p in paths] == [f"{modality}_{i + 1:04d}.dcm" for i in range(len(paths))]
        positions, values = _frames(paths)
        order = list(range(n))[::-1] if reverse else list(range(n))
        for i, k in enumerate(order):  # instance/frame i+1 holds slice k
            np.testing.assert_allclose(positions[i], g.slice_position(k), atol=1e-4)
        expected = image[order]
        tol = {"CT": 0.51, "MR": 0.51, "PT": float(image.max()) / 32767 + 1e-3}[modality]
        np.testing.assert_allclose(values, np.clip(expected, -1024, None), atol=tol)
        head = pydicom.dcmread(paths[0], stop_before_pixels=True)
        assert head.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert head.FrameOfReferenceUID == files.uids["frame_of_reference"]
        assert head.StudyInstanceUID == files.uids["study"]
        if multiframe and modality == "CT":
            assert head.SOPClassUID == ENHANCED_CT_IMAGE_STORAGE


def test_series_attributes(written: dict) -> None:
    _, files = written[("PT+CT", "axial", False, False)]
    ct = pydicom.dcmread(files.series["CT"][0], stop_before_pixels=True)
    pt = pydicom.dcmread(files.series["PT"][0], stop_before_pixels=True)
    assert ct.SeriesDescription == "CT ABDOMEN PORTAL VENOUS" and ct.RescaleIntercept == -1024
    assert ct.RescaleType == "HU" and ct.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert pt.SeriesDescription == "PET WB AC" and pt.Units == "BQML" and pt.DecayCorrection == "START"
    radio = pt.RadiopharmaceuticalInformationSequence[0]
    assert radio.RadionuclideCodeSequence[0].CodeValue == "77004003"
    assert radio.RadiopharmaceuticalCodeSequence[0].CodeValue == "35321007"
    assert ct.FrameOfReferenceUID == pt.FrameOfReferenceUID and ct.StudyInstanceUID == pt.StudyInstanceUID
    assert ct.SeriesInstanceUID != pt.SeriesInstanceUID
    _, mr_files = written[("MR", "oblique", True, False)]
    mr = pydicom.dcmread(mr_files.series["MR"][0], stop_before_pixels=True)
    assert mr.SeriesDescription == "T1 VIBE AX" and mr.ScanningSequence == "GR"
    assert "SP" in mr.SequenceVariant and mr.MRAcquisitionType == "3D"
    assert float(mr.RepetitionTime) < 20 and float(mr.EchoTime) < 5  # short TR/TE: T1-weighted GRE


def test_same_seed_same_uids_and_bytes(tmp_path: Path) -> None:
    p = make_phantom("PT+CT", seed=3, slices=6, size=24)
    a = write_phantom(p, tmp_path / "a", multiframe=True)
    b = write_phantom(make_phantom("PT+CT", seed=3, slices=6, size=24), tmp_path / "b", multiframe=True)
    assert a.uids == b.uids
    for modality in a.series:
        assert a.series[modality][0].read_bytes() == b.series[modality][0].read_bytes()
    c = write_phantom(make_phantom("PT+CT", seed=4, slices=6, size=24), tmp_path / "c")
    assert c.uids["study"] != a.uids["study"]
    single = pydicom.dcmread(c.series["CT"][0], stop_before_pixels=True)
    assert single.SOPInstanceUID != pydicom.dcmread(a.series["CT"][0], stop_before_pixels=True).SOPInstanceUID
    assert deterministic_uid("x", 1) == deterministic_uid("x", 1) != deterministic_uid("x", 2)
    assert deterministic_uid("x").startswith("2.25.") and len(deterministic_uid("x")) <= 64


def test_truth_nifti_and_labels_json(written: dict) -> None:
    phantom, files = written[("CT", "oblique", True, True)]
    img = nib.load(files.truth)
    data = np.asarray(img.dataobj)
    assert data.dtype == np.uint8
    np.testing.assert_array_equal(data, phantom.labels.transpose(2, 1, 0))
    np.testing.assert_allclose(img.affine, phantom.geometry.nifti_affine(), atol=1e-4)
    # A liver voxel, mapped with the NIfTI affine to RAS and back to LPS, lies inside the analytic liver.
    ijk = np.argwhere(data == 1)
    ijk = ijk[np.linspace(0, len(ijk) - 1, 25).astype(int)]
    ras = np.c_[ijk, np.ones(len(ijk))] @ img.affine.T
    lps = (ras @ LPS_TO_RAS.T)[:, :3]
    assert phantom.anatomy.organs["liver"].contains(lps).all()
    meta = json.loads(files.labels_json.read_text())
    assert meta["labels"] == {str(k): v for k, v in PHANTOM_LABELS.items()}
    assert meta["modality"] == "CT" and meta["seed"] == 11 and meta["orientation"] == "oblique"
    np.testing.assert_allclose(meta["geometry"]["affine_nifti_ras"], img.affine, atol=1e-6)
    assert meta["volumes_ml"]["liver"] > 1000


def test_write_series_validates_shape(tmp_path: Path) -> None:
    g = phantom_geometry("axial", 4, 16)
    study = StudyInfo(study_instance_uid=deterministic_uid("study"))
    with pytest.raises(ValueError, match="does not match"):
        write_series(
            np.zeros((3, 16, 16)),
            g,
            "CT",
            tmp_path,
            study=study,
            series_number=1,
            series_description="X",
            frame_of_reference_uid=deterministic_uid("for"),
        )
    with pytest.raises(ValueError, match="modality"):
        write_series(
            np.zeros(g.shape),
            g,
            "US",
            tmp_path,
            study=study,
            series_number=1,
            series_description="X",
            frame_of_reference_uid=deterministic_uid("for"),
        )


# -- CLI -------------------------------------------------------------------------


def test_cli_writes_and_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medsegagent.node.cli import main

    out = tmp_path / "ph"
    argv = ["phantom", "--modality", "MR", "--out", str(out), "--slices", "6", "--size", "24", "--seed", "2"]
    assert main([*argv, "--orientation", "coronal", "--reverse-order"]) == 0
    printed = capsys.readouterr().out
    assert "MR: 6 file(s)" in printed and "truth:" in printed and "labels:" in printed
    assert len(list((out / "dicom").glob("MR_*.dcm"))) == 6
    # A re-run replaces its own files instead of mixing series.
    assert main([*argv, "--multiframe"]) == 0
    assert [p.name for p in (out / "dicom").iterdir()] == ["MR_0001.dcm"]
    assert main(["phantom", "--modality", "CT", "--out", str(tmp_path / "x"), "--size", "4"]) == 2
    assert "--size" in capsys.readouterr().err
    (out / "dicom" / "other.dcm").write_bytes(b"")
    assert main(argv) == 2
    with pytest.raises(SystemExit):
        main(["phantom", "--modality", "XR", "--out", str(out)])
