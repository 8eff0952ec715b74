"""Real scans through the node: Colin27 (a real T1 MRI) and a real Siemens CT series.

* Colin27 (Debian ``mricron-data``) is written as a DICOM MR series by the
  node's own writer; its geometry must be the NIfTI's, voxel for voxel.  It is
  sent to the node over DICOM and skull-stripped by the registry's real brain
  models (HD-BET and deepbet, weights inside their PyPI packages): the fused
  brain must reach Dice >= 0.94 against Colin27's published brain mask.
* The real CT series of the TotalSegmentator source distribution goes through
  a ``serve`` node with DCMTK peers on both sides (JPEG 2000 lossless, as the
  file was stored); the SEG is checked by dciodvfy, dcmqi and highdicom.  The
  only models for abdominal organs installed in CI are the phantom-trained
  demo models: they disagree on real anatomy, and the SEG must say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from medsegagent.dicom.modality import mr_sequence
from medsegagent.dicom.realdata import (
    colin27,
    extract_totalseg_reference_files,
    find_totalseg_sdist,
    repair_anonymised_series,
    write_colin27_series,
)
from medsegagent.dicom.series import read_series, scan_folder
from medsegagent.node.config import parse_config
from medsegagent.node.jobs import JobState
from medsegagent.node.service import Node
from tests.conftest import dciodvfy_errors
from tests.test_node import StoreSCP
from tests.test_seg import dcmqi_labels

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TCP_NODELAY": "1"}
ORGANS = "Segment the liver, spleen, both kidneys, pancreas and aorta"


def test_colin27_as_dicom_has_the_niftis_grid_and_voxels(tmp_path: Path) -> None:
    files = write_colin27_series(tmp_path / "colin27")
    (series,) = scan_folder(tmp_path / "colin27").values()
    volume = read_series(series)
    image = nib.load(colin27().t1)
    data = np.asarray(image.dataobj)
    assert len(files) == 181 and volume.modality == "MR"
    # Every DICOM voxel sits where the NIfTI puts the voxel with the same value.
    k, j, i = np.meshgrid(*(np.arange(0, n, 17) for n in volume.geometry.shape), indexing="ij")
    lps = volume.geometry.index_to_lps(i, j, k)
    ras = np.c_[lps.reshape(-1, 3) * [-1, -1, 1], np.ones(lps.size // 3)]
    ijk = np.rint((np.linalg.inv(image.affine) @ ras.T)[:3]).astype(int)
    assert np.array_equal(volume.array[k, j, i].ravel(), data[tuple(ijk)].astype(np.float32))
    # A radiological axial stack, recognised as T1 by the node's header rules.
    assert volume.geometry.image_orientation == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert mr_sequence(header) == "MR:T1"
    assert header.BodyPartExamined == "HEAD" and header.MagneticFieldStrength == 1.5
    assert dciodvfy_errors(files[0]) == []


def test_colin27_through_the_node_is_skull_stripped_by_the_real_models(tmp_path: Path) -> None:
    from medsegagent.node.demo import run_real_demo

    outcome = run_real_demo(tmp_path, quiet=True)
    report = outcome.result.report
    (segment,) = report["segments"]
    assert segment["label"] == "brain"
    members = outcome.member_dice["brain"]
    # Other installed models of the brain (TotalSegmentator's total_mr) may join; these two always do.
    assert {"hd_bet", "deepbet"} <= set(members), members
    assert min(members["hd_bet"], members["deepbet"]) >= 0.93, members
    assert outcome.dice["brain"] >= 0.94, (outcome.dice, members)
    assert segment["agreement"] == "agreed" and report["quality"]["caution"] is None
    seg = pydicom.dcmread(outcome.result.seg_path)
    assert dciodvfy_errors(outcome.result.seg_path) == []
    assert not seg.SeriesDescription.startswith("[")
    item = seg.SegmentSequence[0]
    assert (item.SegmentLabel, item.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("Brain", "12738006")


@pytest.fixture(scope="module")
def real_ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The sdist's real CT series, with the UIDs its anonymiser emptied filled in."""
    root = tmp_path_factory.mktemp("real-ct")
    sdist = find_totalseg_sdist(Path(os.environ.get("MEDSEG_REALDATA", REPO / ".cache" / "realdata")))
    reference = extract_totalseg_reference_files(sdist, root)
    return repair_anonymised_series(reference / "example_ct_dicom", root / "ct", key="totalseg-example-ct")


def _node(tmp_path: Path, pacs_port: int) -> Node:
    config = {
        "node": {"ae_title": "MEDSEG", "host": "127.0.0.1", "port": 0, "data_dir": str(tmp_path / "var"),
                 "quiet_seconds": 0.5, "collection": "demo", "min_free_disk_mb": 1},
        "peers": [{"ae_title": "MODALITY", "host": "127.0.0.1"}],
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        "presets": {"ABDOMEN": ORGANS},
        "instruction_sources": ["preset"],
        "http": {"enabled": False},
    }  # fmt: skip
    node = Node(parse_config(config), poll_seconds=0.1)
    node.start()
    return node


def test_real_ct_through_the_node_gives_a_valid_seg_that_says_the_demo_models_disagree(
    real_ct: list[Path], tmp_path: Path
) -> None:
    header = pydicom.dcmread(real_ct[0], stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless  # sent as stored
    pacs = StoreSCP(tmp_path / "pacs").start()
    node = _node(tmp_path, pacs.port)
    try:
        # -xv: JPEG 2000 lossless first, as stored (DCMTK cannot transcode JPEG 2000).
        sent = subprocess.run(
            ["/usr/bin/storescu", "-xv", "-aet", "MODALITY", "-aec", "ABDOMEN", "127.0.0.1", str(node.scp.port),
             *map(str, real_ct)],
            env=ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not pacs.segs():
            time.sleep(0.2)
        jobs = node.store.list()
        assert len(pacs.segs()) == 1, [(j.state, j.error) for j in jobs]
        job = jobs[0]
        report = json.loads((Path(job.result_dir) / "report.json").read_text())
    finally:
        node.stop()
        pacs.stop()
    assert job.state in (JobState.WRITTEN, JobState.DELIVERED)
    seg_path = pacs.segs()[0]
    assert dciodvfy_errors(seg_path) == []

    # The caution leads what a PACS lists, and every doubtful segment carries its note.
    seg = hd.seg.segread(seg_path)
    caution = "DEMO MODELS, MODELS DISAGREE, MODELS FAILED"  # the pancreas: both masks implausible
    assert seg.SeriesDescription.startswith(f"[{caution}] SEG")
    assert report["quality"] == {"caution": caution, "demo_models": True}
    doubtful = [s for s in report["segments"] if s["agreement"] in ("disputed", "unconfirmed")]
    assert len(doubtful) >= 3, report["segments"]
    # The SEG's labels are the report's in the SEG's order (written for readers: "Kidney, right").
    notes = dict(
        zip(
            [s["label"] for s in report["segments"]],
            [i.get("SegmentDescription") for i in seg.SegmentSequence],
            strict=True,
        )
    )
    for s in doubtful:
        assert notes[s["label"]] == s["note"]
    failed = [s for s in report["segments"] if s["agreement"] == "empty" and s["note"]]
    assert failed and all(notes[s["label"]] == f"Empty: {s['note']}" for s in failed)

    # dcmqi and highdicom decode the same voxels on the CT's own grid.
    (series,) = scan_folder(real_ct[0].parent).values()
    volume = read_series(series)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_instance_uid
    decoded = dcmqi_labels(seg_path, volume.geometry, tmp_path / "dcmqi")
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    pixels = seg.get_volume(segment_numbers=numbers, allow_missing_positions=True).array
    for index, number in enumerate(numbers):
        assert int(np.count_nonzero(pixels[..., index])) == int(np.count_nonzero(decoded == number))
    assert sorted(set(np.unique(decoded)) - {0}) == [s["number"] for s in report["segments"] if not s["empty"]]
