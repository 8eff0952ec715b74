"""``kill -9`` of a running ``medsegagent serve`` loses no study and duplicates no SEG.

The node runs as a real subprocess; DCMTK storescu sends, DCMTK storescp
receives; the node is killed with SIGKILL during intake, during inference
and during delivery, restarted on the same data directory, and must finish
every job with exactly one SEG (one SOP Instance UID) at the destination.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml

from tests.conftest import pid_is_alive
from tests.test_node import ENV, StoreSCP, _free_port, _wait_port

pytestmark = pytest.mark.slow
TOKEN = "crash-test-token"


class ServeProcess:
    """``medsegagent serve`` in a subprocess with fixed ports (a restart reuses them)."""

    def __init__(self, tmp_path: Path, dest_port: int, *, dest_retry: float = 0.5, intake_processes: int = 1) -> None:
        self.dicom_port, self.http_port = _free_port(), _free_port()
        self.config = tmp_path / "node.yaml"
        self.log = tmp_path / "node.log"
        settings = {
            "node": {
                "ae_title": "MEDSEG",
                "host": "127.0.0.1",
                "port": self.dicom_port,
                "data_dir": str(tmp_path / "var"),
                "quiet_seconds": 2.0,
                "collection": "demo",
                "min_free_disk_mb": 1,
                "intake_processes": intake_processes,
            },
            "peers": [{"ae_title": "MODALITY"}],
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": dest_port}],
            "presets": {"LIVERSEG": "liver"},
            "instruction_sources": ["request", "preset"],
            "http": {"host": "127.0.0.1", "port": self.http_port, "token_env": "MEDSEG_TOKEN"},
            "delivery": {"retry_initial_seconds": dest_retry, "retry_max_seconds": 1.0},
        }
        self.config.write_text(yaml.safe_dump(settings))
        self.proc: subprocess.Popen | None = None
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}",
                                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)  # fmt: skip

    def start(self) -> ServeProcess:
        env = {**ENV, "MEDSEG_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "medsegagent", "serve", "--config", str(self.config)],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_port(self.dicom_port, timeout=60)
        _wait_port(self.http_port, timeout=60)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def jobs(self) -> list[dict]:
        return self.client.get("/jobs").json()

    def wait_for(self, predicate, timeout: float = 120.0, step: float = 0.02) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                jobs = self.jobs()
            except httpx.HTTPError:
                jobs = []
            if predicate(jobs):
                return jobs
            time.sleep(step)
        pytest.fail(f"timed out; jobs: {self.jobs()}\n{self.log.read_text()[-3000:]}")


def _send(files: list[Path], port: int, called: str = "LIVERSEG") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/usr/bin/storescu", "-aet", "MODALITY", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _distinct_seg_uids(pacs: StoreSCP) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pacs.segs()}


def _state_is(state: str):
    return lambda jobs: bool(jobs) and any(j["state"] == state for j in jobs)


def _all_delivered(jobs: list[dict]) -> bool:
    return bool(jobs) and all(j["state"] == "delivered" for j in jobs)


@pytest.mark.parametrize("moment", ["intake", "inference", "delivery"])
def test_kill9_loses_nothing_and_duplicates_nothing(phantom_factory, tmp_path, moment):
    dest_port = _free_port()
    pacs = StoreSCP(tmp_path / "pacs", dest_port)
    _, files = phantom_factory("CT", seed=5, size=96, slices=32)
    study = files.series["CT"]
    node = ServeProcess(tmp_path, dest_port).start()
    try:
        if moment == "intake":
            sender = subprocess.Popen(
                ["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "LIVERSEG", "127.0.0.1", str(node.dicom_port),
                 *map(str, study)],
                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            spool = tmp_path / "var" / "spool"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(list(spool.rglob("*.dcm"))) < 5:
                time.sleep(0.005)
            node.kill9()
            sender.wait(timeout=30)
            stored = len(list(spool.rglob("*.dcm")))
            assert 0 < stored <= len(study)
            node.start()
            assert not list(spool.rglob("*.tmp")), "stale partial writes are removed at start"
            # The modality re-sends what failed (here: the whole study, as storescu would on retry).
            assert _send(study, node.dicom_port).returncode == 0
            pacs.start()
        elif moment == "inference":
            pacs.start()
            assert _send(study, node.dicom_port).returncode == 0
            node.wait_for(_state_is("running"), step=0.01)
            node.kill9()
            node.start()
        else:  # delivery: destination down, result written and queued, then kill
            assert _send(study, node.dicom_port).returncode == 0
            node.wait_for(_state_is("written"))
            node.kill9()
            pacs.start()
            node.start()
        jobs = node.wait_for(_all_delivered)
        assert len(jobs) == 1, jobs
        # Every instance of the study is in the spool, once.
        study_uid = jobs[0]["study_uid"]
        assert len(list((tmp_path / "var" / "spool" / study_uid).rglob("*.dcm"))) == len(study)
        time.sleep(0.5)
        assert len(_distinct_seg_uids(pacs)) == 1
        detail = node.client.get(f"/jobs/{jobs[0]['id']}").json()
        states = [h["state"] for h in detail["history"]]
        assert states[-1] == "delivered"
        if moment == "inference":
            assert states.count("received") == 2  # resumed after the crash
    finally:
        node.stop()
        pacs.stop()


def test_kill9_with_several_intake_processes_leaves_no_orphan_and_loses_nothing(phantom_factory, tmp_path):
    """``kill -9`` of a node with 3 intake processes during intake from 3 parallel associations."""
    dest_port = _free_port()
    pacs = StoreSCP(tmp_path / "pacs", dest_port)
    _, files = phantom_factory("CT", seed=6, size=96, slices=36)
    study = files.series["CT"]
    node = ServeProcess(tmp_path, dest_port, intake_processes=3).start()
    try:
        workers = [int(pid) for pid in re.findall(r"intake process (\d+) serves port", node.log.read_text())]
        assert len(workers) == 2
        senders = [
            subprocess.Popen(["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "LIVERSEG", "127.0.0.1",
                              str(node.dicom_port), *map(str, study[i::3])],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(3)
        ]  # fmt: skip
        spool = tmp_path / "var" / "spool"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(list(spool.rglob("*.dcm"))) < 6:
            time.sleep(0.005)
        node.kill9()
        for sender in senders:
            sender.wait(timeout=30)
        # The intake processes die with the node (PR_SET_PDEATHSIG): nothing keeps serving the port.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_is_alive(pid) for pid in workers):
            time.sleep(0.05)
        assert not any(pid_is_alive(pid) for pid in workers)
        pacs.start()
        node.start()
        assert _send(study, node.dicom_port).returncode == 0
        jobs = node.wait_for(_all_delivered)
        assert len(jobs) == 1, jobs
        assert len(list((spool / jobs[0]["study_uid"]).rglob("*.dcm"))) == len(study)
        time.sleep(0.5)
        assert len(_distinct_seg_uids(pacs)) == 1
    finally:
        node.stop()
        pacs.stop()
