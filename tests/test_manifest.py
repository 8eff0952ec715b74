"""The study manifest: built from the intake's scan, read instead of the headers, rebuilt when it is not there.

A live node receives a phantom CT and a request SR from DCMTK ``storescu``;
every ``pydicom.dcmread`` of the job is counted per file: each instance is
parsed at most once (the intake's byte scan is no parse).  The manifest is
kept in the study's spool folder, reused across a restart, and rebuilt
(from the journal, or by scanning the files again) when missing, stale or
unreadable.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pydicom
import pytest

from medsegagent.dicom.series import scan_folder
from medsegagent.node.config import parse_config
from medsegagent.node.jobs import JobState
from medsegagent.node.manifest import JOURNAL, MANIFEST, SeriesKind, StudyManifest, load_manifest, scan_file
from medsegagent.node.service import Node
from tests.test_node import TOKEN, _config, _free_port, _request_sr, _storescu, _wait_state

pytestmark = pytest.mark.slow


@pytest.fixture
def parses(monkeypatch) -> Counter:
    """``pydicom.dcmread`` calls by file name, from the moment the fixture is taken."""
    counted: Counter = Counter()
    read = pydicom.dcmread

    def counting(source, *args, **kwargs):
        counted[Path(str(source)).name] += 1
        return read(source, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return counted


def test_each_header_is_parsed_at_most_once_per_job(phantom_factory, tmp_path, monkeypatch, parses, caplog):
    monkeypatch.setenv("MEDSEG_TEST_TOKEN", TOKEN)
    _, files = phantom_factory("CT", seed=2, size=96, slices=32)
    ct = files.series["CT"]
    request = _request_sr(ct[0], "please segment the spleen", tmp_path / "request_sr.dcm")
    parses.clear()  # the test's own reads of the fixtures
    node = Node(parse_config(_config(tmp_path, _free_port())), poll_seconds=0.1)
    node.start()
    try:
        _storescu([*ct, request], node.scp.port)
        assert sum(parses.values()) == 0  # the intake scans bytes; it parses no header
        caplog.set_level(logging.INFO, logger="medsegagent.node.manifest")
        (job,) = _wait_state(node, {JobState.WRITTEN, JobState.DELIVERED, JobState.FAILED})
    finally:
        node.stop()
    assert job.state is not JobState.FAILED, job.error
    assert job.request_source == "sr" and job.report["segments"][0]["label"] == "spleen"
    sent = {f"{pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm" for p in [*ct, request]}
    parsed = {name: count for name, count in parses.items() if name in sent}
    # Every CT slice once (header and pixels together, the header then serves the SEG), the SR once.
    assert parsed == dict.fromkeys(sent, 1), {n: c for n, c in parsed.items() if c != 1}
    study_dir = node.spool_dir / job.study_uid
    assert len((study_dir / JOURNAL).read_text().splitlines()) == len(sent)
    assert "scanning 0 file(s) again" in caplog.text  # folded from the journal, not from the files
    manifest = StudyManifest.from_json(json.loads((study_dir / MANIFEST).read_text()))
    kinds = sorted((s.kind, len(s.instances)) for s in manifest.series)
    assert kinds == [(SeriesKind.IMAGE, len(ct)), (SeriesKind.SR, 1)]
    assert manifest.routing_modality() == "CT" and manifest.sr_files


def test_manifest_matches_the_headers_and_orders_slices(phantom_factory, tmp_path):
    _, files = phantom_factory("PT+CT", seed=1, slices=12, size=32, reverse_order=True)
    study = tmp_path / "study"
    shutil.copytree(files.dicom_dir, study)
    manifest = load_manifest(study)
    scanned = scan_folder(study)
    infos = manifest.series_infos(study)
    assert infos.keys() == scanned.keys()
    for uid, info in scanned.items():
        mine = infos[uid]
        assert (mine.modality, mine.description, mine.series_number, mine.is_image, mine.number_of_frames) == (
            info.modality, info.description, info.series_number, info.is_image, info.number_of_frames)  # fmt: skip
        assert sorted(mine.files) == sorted(info.files)
        # Slice order: ascending along the normal (the files were written in reverse).
        z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in mine.files]
        assert z == sorted(z)
    assert manifest.routing_modality() == "PT+CT"
    keys = manifest.keys
    header = pydicom.dcmread(files.series["CT"][0], stop_before_pixels=True)
    assert (keys.accession_number, keys.patient_id, keys.patient_name, keys.study_description) == (
        header.AccessionNumber, header.PatientID, str(header.PatientName), header.StudyDescription)  # fmt: skip
    assert StudyManifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest


def test_manifest_survives_a_restart_and_is_rebuilt_when_missing_stale_or_torn(phantom_factory, tmp_path, caplog):
    _, files = phantom_factory("CT", seed=2, size=96, slices=32)
    study = tmp_path / "study"
    shutil.copytree(files.dicom_dir, study)
    caplog.set_level(logging.INFO, logger="medsegagent.node.manifest")
    first = load_manifest(study)
    assert "manifest missing" in caplog.text and (study / MANIFEST).is_file()
    caplog.clear()
    assert load_manifest(study) == first and not caplog.text  # a restart reads the stored one

    (study / MANIFEST).unlink()
    assert load_manifest(study) == first and "manifest missing" in caplog.text
    caplog.clear()
    (study / MANIFEST).write_text('{"version": 1, "series": [')  # torn by hand
    assert load_manifest(study) == first and "unreadable" in caplog.text
    caplog.clear()
    removed = sorted(study.rglob("*.dcm"))[0]
    removed.unlink()  # the spool changed under it: stale
    smaller = load_manifest(study)
    assert "manifest stale" in caplog.text and smaller.files == first.files - {removed.name}


def _study_with_request_attributes(phantom_factory, study_dir: Path, text: str) -> list[Path]:
    """Three CT slices in a spool-like folder, each with the request inside a Request Attributes Sequence."""
    _, files = phantom_factory("CT", seed=4, size=32, slices=3)
    written = []
    for path in files.series["CT"]:
        ds = pydicom.dcmread(path)
        ds.pop("RequestedProcedureDescription", None)
        item = pydicom.Dataset()
        item.RequestedProcedureID = "RP7"
        item.RequestedProcedureDescription = text
        ds.RequestAttributesSequence = pydicom.Sequence([item])
        target = study_dir / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def test_tags_source_reads_the_request_attributes_from_the_manifest_not_the_files(phantom_factory, tmp_path, parses):
    """The intake's scan reads the Request Attributes Sequence: the tags source parses no header."""
    from medsegagent.node.instructions import tag_request

    study_dir = tmp_path / "spool" / "1.2.3"
    files = _study_with_request_attributes(phantom_factory, study_dir, "CT ABDOMEN - LIVER AND SPLEEN")
    parses.clear()
    manifest = load_manifest(study_dir)
    assert manifest.keys.request_attributes_procedure == "CT ABDOMEN - LIVER AND SPLEEN"
    assert manifest.request_attribute_files == ()
    assert tag_request(study_dir, manifest=manifest) == "CT ABDOMEN - LIVER AND SPLEEN"
    assert sum(parses.values()) == 0
    # A journal written before the scan read the sequence flags the file: the tags source parses it then.
    lines = []
    for path in files:
        facts = {**asdict(scan_file(path)), "has_request_attributes": True}
        del facts["request_attributes_procedure"]
        lines.append(json.dumps({"file": path.relative_to(study_dir).as_posix(), "facts": facts}) + "\n")
    (study_dir / MANIFEST).unlink()
    (study_dir / JOURNAL).write_text("".join(lines))
    flagged = load_manifest(study_dir)
    assert len(flagged.request_attribute_files) == 3 and not flagged.keys.request_attributes_procedure
    parses.clear()
    assert tag_request(study_dir, manifest=flagged) == "CT ABDOMEN - LIVER AND SPLEEN"
    assert sum(parses.values()) == 1  # the first file names the procedure: the others are not parsed
