"""DICOMweb destinations: STOW-RS of the node's SEG to a real Orthanc (DICOMweb plugin, HTTP authentication).

:func:`medsegagent.node.dispatch.deliver` is checked against Orthanc
directly (stored unchanged, wrong password and wrong path give up with the
HTTP status, an unset password variable waits); then the node's durable
outbox: a destination that is down is retried until Orthanc comes up and
then has the SEG once, a destination that refuses the node's credentials
gives up with the reason, the job fails naming it, and every delivery log
line names the job and the study.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from medsegagent.dicom.seg import SegType
from medsegagent.node.config import parse_config
from medsegagent.node.dispatch import DELIVERED, Outcome, deliver
from medsegagent.node.jobs import FailureReason, JobState
from medsegagent.node.service import Node
from tests.conftest import wait_for
from tests.orthanc_helpers import DICOMWEB_PLUGIN, OrthancProcess

USER, PASSWORD = "medseg", "stow-s3cret"


def orthanc_config() -> dict:
    """Orthanc with only the DICOMweb plugin, and HTTP basic authentication even on loopback."""
    return {"Name": "dicomweb-test", "DicomAet": "ORTHANC", "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}}  # fmt: skip


def make_orthanc(root: Path) -> OrthancProcess:
    return OrthancProcess(root, config=orthanc_config(), plugins=("dicom-web",), user=USER, password=PASSWORD)


def destination(name: str, url: str, password_file: Path, **extra) -> dict:
    return {"name": name, "kind": "dicomweb", "url": url, "username": USER, "password_file": str(password_file),
            "timeout_s": 10, **extra}  # fmt: skip


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[OrthancProcess]:
    running = make_orthanc(tmp_path_factory.mktemp("orthanc-dicomweb")).start()
    yield running
    running.stop()


@pytest.fixture
def secrets(tmp_path) -> dict[str, Path]:
    (tmp_path / "right.pw").write_text(PASSWORD + "\n")
    (tmp_path / "wrong.pw").write_text("not-the-password")
    return {"right": tmp_path / "right.pw", "wrong": tmp_path / "wrong.pw"}


@pytest.fixture
def seg(seg_factory, tmp_path) -> Path:
    return seg_factory(tmp_path / "seg", SegType.BINARY, uid_key=f"dicomweb-{tmp_path.name}").path


def config_of(destinations: list[dict], data_dir: Path | None = None):
    node = {"data_dir": str(data_dir or Path("/nonexistent")), "port": 0, "min_free_disk_mb": 1}
    return parse_config({"node": node, "destinations": destinations, "http": {"enabled": False},
                         "delivery": {"retry_initial_seconds": 0.3, "retry_max_seconds": 0.6}})  # fmt: skip


def test_stow_stores_the_seg_unchanged(orthanc, secrets, seg):
    [dest] = config_of([destination("web", f"{orthanc.url}/dicom-web/", secrets["right"])]).destinations
    assert deliver(dest, [seg], calling_ae="MEDSEG") == {seg: DELIVERED}
    ours = pydicom.dcmread(seg)
    stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(str(ours.SOPInstanceUID))))
    assert stored.SOPClassUID == ours.SOPClassUID
    assert stored.file_meta.TransferSyntaxUID == ours.file_meta.TransferSyntaxUID
    assert stored.PixelData == ours.PixelData and stored.SegmentSequence == ours.SegmentSequence


@pytest.mark.parametrize(("password", "path", "status"), [("wrong", "/dicom-web", 401), ("right", "/dicom-webx", 404)])
def test_http_4xx_gives_up_with_the_status(orthanc, secrets, seg, password, path, status):
    [dest] = config_of([destination("web", orthanc.url + path, secrets[password])]).destinations
    [outcome] = deliver(dest, [seg], calling_ae="MEDSEG").values()
    assert outcome.outcome is Outcome.GIVE_UP and f"HTTP {status}" in outcome.reason and orthanc.url in outcome.reason


def test_unset_token_variable_waits_with_its_name(monkeypatch, seg):
    monkeypatch.delenv("MEDSEG_TEST_STOW_TOKEN", raising=False)
    [dest] = config_of([{"name": "web", "kind": "dicomweb", "url": "https://pacs.example/dicom-web",
                         "token_env": "MEDSEG_TEST_STOW_TOKEN"}]).destinations  # fmt: skip
    [outcome] = deliver(dest, [seg], calling_ae="MEDSEG").values()
    assert outcome.outcome is Outcome.RETRY and "$MEDSEG_TEST_STOW_TOKEN is not set" in outcome.reason


@pytest.mark.slow
def test_outbox_retries_a_down_server_then_delivers_and_gives_up_on_4xx(tmp_path, secrets, seg, caplog):
    later = make_orthanc(tmp_path / "orthanc")  # its ports are chosen now; it starts after the first attempts
    url = f"{later.url}/dicom-web"
    config = config_of([destination("web", url, secrets["right"]), destination("web-bad", url, secrets["wrong"])],
                       tmp_path / "node")  # fmt: skip
    node = Node(config, poll_seconds=0.1)
    study_uid = str(pydicom.dcmread(seg, stop_before_pixels=True).StudyInstanceUID)
    job = node.store.create_job(study_uid, explicit_request="spleen")
    node.store.claim_next()
    node.store.transition(job.id, JobState.RUNNING)
    node.store.enqueue_results(job.id, {"web": [str(seg)], "web-bad": [str(seg)]}, {"outputs": ["seg.dcm"]})
    caplog.set_level(logging.INFO, logger="medsegagent.node.service")
    node.start()
    try:
        wait_for(lambda: all(i.attempts >= 2 for i in node.store.outbox(job.id)), 60, "two attempts each while down")
        assert all(i.state == "pending" and "ConnectionError" in i.last_error for i in node.store.outbox(job.id))
        later.start()
        job = wait_for(lambda: (j := node.store.get(job.id)).state is JobState.FAILED and j, 60, "the job to end")
        assert later.client.studies.lookup(study_uid) is not None  # the SEG is in Orthanc once, from "web"
        assert len(later.client.get_json("/instances")) == 1
    finally:
        node.stop()
        later.stop()
    items = {i.destination: i for i in node.store.outbox(job.id)}
    assert items["web"].state == "sent" and items["web-bad"].state == "failed"
    assert "HTTP 401" in items["web-bad"].last_error
    assert job.reason is FailureReason.DELIVERY_FAILED and "HTTP 401" in job.error
    lines = [r.getMessage() for r in caplog.records if seg.name in r.getMessage()]
    assert lines and all(f"{seg.name} of job {job.id} (study {study_uid}) to web" in line for line in lines), lines
    assert f"delivered {seg.name} of job {job.id} (study {study_uid}) to web" in lines
