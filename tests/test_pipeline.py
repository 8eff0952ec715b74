"""``medsegagent segment`` and ``medsegagent demo`` end to end with the real demo models.

Nothing is mocked: the MONAI bundles shipped in ``models/bundles`` run on the
CPU, the SEG is validated with dciodvfy, and Dice is computed against the
phantom's truth.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
import yaml

from medsegagent.models.registry import load_registry
from medsegagent.node.cli import main
from medsegagent.node.demo import organ_dice, run_demo
from tests.conftest import dciodvfy_errors

pytestmark = pytest.mark.slow


def _demo_models_installed() -> None:
    registry = load_registry()
    missing = [ref.name for ref in registry.models() if ref.dataset.startswith("Demo_") and not ref.installed]
    if missing:
        pytest.fail(f"demo bundles missing: {missing}; run python -m medsegagent.models.train_demo")


def test_segment_writes_valid_seg_report_and_preview(phantom_factory, tmp_path, capsys):
    _demo_models_installed()
    phantom, files = phantom_factory("CT", seed=3, size=96, slices=40, orientation="axial")
    out = tmp_path / "out"
    assert main(["segment", str(files.dicom_dir), "liver, spleen and both kidneys", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["preview.png", "report.json", "seg.dcm"]
    assert dciodvfy_errors(out / "seg.dcm") == []
    report = json.loads((out / "report.json").read_text())
    labels = [s["label"] for s in report["segments"]]
    assert labels == ["liver", "spleen", "kidney_right", "kidney_left"]
    assert {m["name"] for m in report["models"]} == {"demo_ct_unet", "demo_ct_unet_bn"}
    assert all(m["status"] == "ok" for m in report["models"])
    assert report["request"]["text"] == "liver, spleen and both kidneys"
    assert set(report["timings_s"]) >= {"read", "plan", "inference", "ensemble", "write"}
    seg = pydicom.dcmread(out / "seg.dcm")
    # The SEG names segments as a radiologist writes them; the report keeps the registry's names.
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Liver", "Spleen", "Kidney, right", "Kidney, left"]
    # Its own Series Number, above the study's (the phantom's CT is series 1... n).
    assert int(seg.SeriesNumber) > max(int(pydicom.dcmread(p, stop_before_pixels=True).SeriesNumber)
                                       for p in files.dicom_dir.rglob("*.dcm"))  # fmt: skip
    # The liver volume in the report is the phantom's liver (+ tumour) within 15 %.
    truth_ml = phantom.volumes_ml()["liver"] + phantom.volumes_ml()["liver_tumour"]
    assert report["segments"][0]["volume_ml"] == pytest.approx(truth_ml, rel=0.15)
    assert "seg.dcm" in capsys.readouterr().out


def test_sagittal_study_lands_on_the_organs(phantom_factory, tmp_path):
    """Segmentation of a non-axial series still overlaps the truth (geometry end to end)."""
    _demo_models_installed()
    from medsegagent.node.pipeline import segment_folder

    phantom, files = phantom_factory("CT", seed=4, size=96, slices=48, orientation="sagittal")
    result = segment_folder(files.dicom_dir, "liver and spleen", tmp_path / "out")
    dice = organ_dice(phantom, result.volume, result.labels, ["liver", "spleen"])
    assert dice["liver"] > 0.8, dice
    assert dice["spleen"] > 0.7, dice


def test_failing_model_is_reported_and_the_other_member_carries_on(phantom_factory, tmp_path):
    _demo_models_installed()
    registry_file = load_registry().path
    data = yaml.safe_load(registry_file.read_text())
    bundles = registry_file.resolve().parent / "models" / "bundles"
    broken = tmp_path / "broken_bundle"
    shutil.copytree(bundles / "demo_ct_unet", broken)
    (broken / "models" / "model.pt").write_bytes(b"not a checkpoint")
    for ref in data["datasets"]["Demo_CT_Abdomen"]["models"]:
        ref["location"] = str(broken) if ref["name"] == "demo_ct_unet" else str(bundles / ref["name"])
    for ref in data["datasets"]["Demo_MR_Abdomen"]["models"]:
        ref["location"] = str(bundles / ref["name"])
    custom = tmp_path / "registry.yaml"
    custom.write_text(yaml.safe_dump(data, sort_keys=False))
    _, files = phantom_factory("CT", seed=3, size=96, slices=40, orientation="axial")
    out = tmp_path / "out"
    assert main(["segment", str(files.dicom_dir), "spleen", "-o", str(out), "--registry", str(custom)]) == 0
    report = json.loads((out / "report.json").read_text())
    status = {m["name"]: m["status"] for m in report["models"]}
    assert status == {"demo_ct_unet_bn": "ok", "demo_ct_unet": "failed"}
    assert report["segments"][0]["weights"] == {"demo_ct_unet_bn": 1.0}


@pytest.mark.parametrize(
    ("setup", "text", "message"),
    [
        ("empty", "liver", "no DICOM"),
        ("gap", "liver", "missing"),
        ("ok", "segment the brain", "nothing to segment"),
    ],
)
def test_bad_input_exits_non_zero_and_leaves_nothing(phantom_factory, tmp_path, capsys, setup, text, message):
    src = tmp_path / "in"
    src.mkdir()
    _, files = phantom_factory("CT")
    if setup == "empty":
        (src / "readme.txt").write_text("no images here")
    else:
        for path in files.series["CT"]:
            shutil.copy(path, src / path.name)
        if setup == "gap":
            sorted(src.glob("*.dcm"))[7].unlink()
    out = tmp_path / "out"
    assert main(["segment", str(src), text, "-o", str(out), "--collection", "demo"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_demo_end_to_end_meets_dice(tmp_path):
    """The README's first command: every demo organ reaches Dice >= 0.85 on the demo study."""
    _demo_models_installed()
    outcome = run_demo(tmp_path / "demo", quiet=True)
    assert outcome.instances == 64
    assert set(outcome.dice) == {"liver", "spleen", "kidney_right", "kidney_left", "pancreas", "aorta"}
    low = {k: round(v, 3) for k, v in outcome.dice.items() if v < 0.85}
    assert not low, f"Dice below 0.85: {low}"
    assert dciodvfy_errors(outcome.result.seg_path) == []
    assert np.any(outcome.result.labels)


def test_mr_demo_finds_every_organ_including_the_aorta(tmp_path):
    """``medsegagent demo --modality MR``: both MR models run and every organ, the aorta's flow void included,
    reaches Dice >= 0.8 on the demo study."""
    _demo_models_installed()
    outcome = run_demo(tmp_path / "demo", modality="MR", quiet=True)
    assert {m["name"]: m["status"] for m in outcome.result.report["models"]} == {
        "demo_mr_unet": "ok",
        "demo_mr_unet_bn": "ok",
    }
    assert set(outcome.dice) == {"liver", "spleen", "kidney_right", "kidney_left", "pancreas", "aorta"}
    low = {k: round(v, 3) for k, v in outcome.dice.items() if v < 0.8}
    assert not low, f"MR Dice below 0.8: {low}"


def test_study_with_several_series_segments_the_one_the_plan_routed(phantom_factory, tmp_path):
    """CT and MR series in one folder: the segmented series is of the routing modality, and the report says which."""
    _demo_models_installed()
    from medsegagent.node.pipeline import segment_folder

    _, ct = phantom_factory("CT", seed=3, size=96, slices=40)
    _, mr = phantom_factory("MR", seed=3, size=96, slices=40)
    mixed = tmp_path / "mixed"
    for sub, paths in (("ct", ct.series["CT"]), ("mr", mr.series["MR"])):
        (mixed / sub).mkdir(parents=True)
        for path in paths:
            shutil.copy(path, mixed / sub / path.name)
    result = segment_folder(mixed, "liver", tmp_path / "out")
    report = result.report
    assert report["series"]["modality"] == report["modality"].split(":")[0]
    # The headers make this an MR study (a CT beside it is context); the MR models ran on the MR series.
    assert report["modality"].startswith("MR")
    assert {m["name"] for m in report["models"]} == {"demo_mr_unet", "demo_mr_unet_bn"}
    assert report["series"]["uid"] in {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID
                                       for p in (ct.series["CT"][0], mr.series["MR"][0])}  # fmt: skip


def test_labelmap_copy_and_volume_report_each_get_a_series_of_their_own(phantom_factory, tmp_path):
    """A LABELMAP copy (for destinations that take one) beside the BINARY SEG, the SR on the BINARY one."""
    from medsegagent.node.pipeline import OutputOptions, RunContext, segment_folder

    _demo_models_installed()
    _, files = phantom_factory("CT", seed=3, size=96, slices=40, orientation="axial")
    out = tmp_path / "out"
    context = RunContext.in_process(outputs=OutputOptions(labelmap_copy=True, volume_report=True, preview_sc=True))
    result = segment_folder(files.dicom_dir, "liver and spleen", out, context, collection="demo")
    assert result.report["outputs"] == ["seg.dcm", "preview.png", "seg-labelmap.dcm", "sr.dcm", "preview-sc.dcm"]
    binary, labelmap, sr, sc = (
        pydicom.dcmread(out / n) for n in ("seg.dcm", "seg-labelmap.dcm", "sr.dcm", "preview-sc.dcm")
    )
    assert labelmap.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
    assert labelmap.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert dciodvfy_errors(out / "seg-labelmap.dcm") == []
    labelled = [s.SegmentLabel for s in labelmap.SegmentSequence if s.SegmentNumber > 0]  # 0: its background
    assert labelled == [s.SegmentLabel for s in binary.SegmentSequence]
    study = max(int(pydicom.dcmread(p, stop_before_pixels=True).SeriesNumber) for p in files.dicom_dir.rglob("*.dcm"))
    assert [int(ds.SeriesNumber) for ds in (binary, labelmap, sr, sc)] == [study + 1, study + 2, study + 3, study + 4]
    assert len({ds.SeriesInstanceUID for ds in (binary, labelmap, sr, sc)}) == 4
    # The SR measures the BINARY SEG's segments (TID 1500 never references a LABELMAP SEG).
    assert binary.SOPInstanceUID in repr(sr) and labelmap.SOPInstanceUID not in repr(sr)
